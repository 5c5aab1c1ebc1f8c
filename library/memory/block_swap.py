"""Block swapping (kohya --blocks_to_swap): the last N blocks' frozen weights live in pinned CPU memory and
visit the GPU one block at a time, in forward and again in backward.

Schedule (the same with or without gradient checkpointing): at most two swapped blocks are on the device at
any time, the one running and the next one, whose copy runs on a side CUDA stream while the current block
computes. Forward: before block i runs, blocks other than i and i + 1 leave, block i is waited for and
block i + 1 is fetched. The last block stays for backward, which starts with it. Backward: before block k's
backward (a hook on the gradient of its outputs, or its recompute under checkpointing), blocks other than
k and k - 1 leave, block k is waited for and block k - 1 is fetched.

Unlike kohya, which copies each evicted block back to the CPU and synchronises the host twice per swap,
nothing is copied back (base weights are frozen, the pinned copy stays valid) and nothing waits on the
host: the compute stream waits on a CUDA event, and `record_stream` keeps an evicted block's memory from
being reused while kernels still read it. Trainable tensors inside a block stay on the device. The swapped
blocks' Linear layers get the forward of library/memory/linear.py, which saves the weight parameter rather
than a view of its storage, so an evicted block really leaves the device until its backward.

A block list is any sequence of modules in execution order: FLUX's ModuleLists, or the SD/SDXL UNet's
resnets, attentions and resamplers (library/families/sd_blocks.py), a plain list so that no module is
registered twice on the model. Backward runs autograd nodes in reverse creation order, so block k's backward
is over before block k - 1's output gradient is complete, skip connections included. Conv2d and GroupNorm
(the UNet's resnets) save the weight parameter itself for backward when it is in the compute dtype, which it
is in training (weights load in the mixed-precision dtype), so they need no forward of their own: backward
reads the storage the parameter has then. (Under autocast a cast copy would be saved instead; that only
happens with weights in another dtype, and GroupNorm's fp32 copy under CUDA autocast is a few KB.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from library.memory.linear import restore_forward, save_weight_not_view

log = logging.getLogger(__name__)


class Mover(Protocol):
    """Moves one block's weights; the scheduler decides when. Injected by tests to record the order."""

    def fetch(self, index: int) -> None:
        """Start copying block `index` to the device (asynchronously)."""

    def wait(self, index: int) -> None:
        """Make the compute stream wait until block `index` has arrived (no host synchronisation)."""

    def evict(self, index: int) -> None:
        """Point block `index` back at its CPU copy; its device memory is freed once the GPU is done."""


def _frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    params = [p for p in block.parameters() if not p.requires_grad]
    return params + list(block.buffers())


class CudaMover:
    """Pinned CPU copies, a side stream for the host-to-device copies and one event per block."""

    def __init__(self, blocks: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.tensors = {i: _frozen_tensors(b) for i, b in enumerate(blocks)}
        self.pinned = {i: [t.detach().to("cpu").pin_memory() for t in ts] for i, ts in self.tensors.items()}
        for i, tensors in self.tensors.items():
            for tensor, host in zip(tensors, self.pinned[i], strict=True):
                tensor.data = host
        self.stream = torch.cuda.Stream(device)
        self.events = {i: torch.cuda.Event() for i in self.tensors}

    def fetch(self, index: int) -> None:
        with torch.cuda.stream(self.stream):
            for tensor, host in zip(self.tensors[index], self.pinned[index], strict=True):
                tensor.data = host.to(self.device, non_blocking=True)
            self.events[index].record(self.stream)

    def wait(self, index: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.events[index])

    def evict(self, index: int) -> None:
        compute = torch.cuda.current_stream(self.device)
        for tensor, host in zip(self.tensors[index], self.pinned[index], strict=True):
            tensor.data.record_stream(compute)
            tensor.data = host

    def restore(self, index: int) -> None:
        for tensor, host in zip(self.tensors[index], self.pinned[index], strict=True):
            tensor.data = host.to(self.device)


def _in_backward() -> bool:
    # A forward inside backward is a checkpoint recompute: it runs in backward order. (torch.utils.checkpoint
    # asks the same private function.)
    return torch._C._current_graph_task_id() != -1


def _tensors(output: Any) -> list[torch.Tensor]:
    items = output if isinstance(output, (tuple, list)) else (output,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


class BlockSwapper:
    """Swap the last `blocks_to_swap` of `blocks` (modules in execution order) between pinned CPU memory and
    `device` (see the module doc).

    Apply to a model whose other parts are on `device` already and whose swapped blocks are anywhere (they
    are moved to pinned CPU memory here). Undo with `remove()`, which puts them on the device. On a device
    other than CUDA this does nothing (and says so once); `mover` replaces the CUDA mechanics in tests.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        blocks_to_swap: int,
        device: torch.device | str,
        *,
        mover: Mover | None = None,
    ) -> None:
        n = len(blocks)
        if not 0 <= blocks_to_swap <= n:
            raise ValueError(f"blocks_to_swap must be in [0, {n}] for {n} blocks, got {blocks_to_swap}")
        self.device = torch.device(device)
        self.num_blocks = n
        self.first_swapped = n - blocks_to_swap
        self.resident: set[int] = set()  # swapped blocks on the device or on their way
        self.waited: set[int] = set()
        self.handles: list[Any] = []
        self.linears: list[nn.Linear] = []
        self.mover: Mover | None = None
        if blocks_to_swap == 0:
            return
        if mover is None and self.device.type != "cuda":
            log.info(
                "blocks_to_swap=%d ignored: block swapping needs a CUDA device, not %s",
                blocks_to_swap,
                device,
            )
            return
        if mover is None:
            swapped = list(blocks)[self.first_swapped :]
            real = CudaMover(swapped, self.device)
            mover = _Offset(real, self.first_swapped)
        self.mover = mover
        # Their Linear layers must save the weight parameter for backward, not a view of the device storage
        # it had in forward: the view would keep every swapped block on the device until backward.
        self.linears = [
            m
            for block in list(blocks)[self.first_swapped :]
            for m in block.modules()
            if isinstance(m, nn.Linear) and not m.weight.requires_grad and save_weight_not_view(m)
        ]
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self.handles.append(block.register_forward_hook(self._post_hook(i)))

    @property
    def active(self) -> bool:
        return self.mover is not None

    def _swapped(self, index: int) -> bool:
        return self.first_swapped <= index < self.num_blocks

    def _keep_only(self, keep: tuple[int, int]) -> None:
        for index in sorted(self.resident - set(keep)):
            self.mover.evict(index)  # type: ignore[union-attr]
            self.resident.discard(index)
            self.waited.discard(index)

    def _prefetch(self, index: int) -> None:
        if self._swapped(index) and index not in self.resident:
            self.mover.fetch(index)  # type: ignore[union-attr]
            self.resident.add(index)

    def _arrive(self, index: int, following: int) -> None:
        """Block `index` runs next and `following` after it: make room, wait for it, fetch the next."""
        self._keep_only((index, following))
        if self._swapped(index):
            self._prefetch(index)
            if index not in self.waited:
                self.mover.wait(index)  # type: ignore[union-attr]
                self.waited.add(index)
        self._prefetch(following)

    def _pre_hook(self, index: int) -> Callable[[nn.Module, Any], None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            if _in_backward():
                self._arrive(index, index - 1)
            else:
                self._arrive(index, index + 1)

        return hook

    def _post_hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, args: Any, output: Any) -> None:
            if _in_backward():
                return
            inputs = {id(a) for a in args}
            # An input handed back unchanged gets its gradient late; only the block's own outputs count.
            needs_grad = (
                [t for t in _tensors(output) if id(t) not in inputs] if torch.is_grad_enabled() else []
            )
            if needs_grad:
                fired = [False]

                def on_grad(grad: torch.Tensor) -> None:
                    # The first output gradient of this call means its backward starts now.
                    if not fired[0]:
                        fired[0] = True
                        self._arrive(index, index - 1)

                for tensor in needs_grad:
                    tensor.register_hook(on_grad)
            elif index == self.num_blocks - 1:
                self._keep_only((-1, -1))  # inference: nothing follows

        return hook

    def remove(self) -> None:
        """Remove the hooks and put every swapped block on the device for good."""
        for handle in self.handles:
            handle.remove()
        for linear in self.linears:
            restore_forward(linear)
        self.handles, self.linears = [], []
        if isinstance(self.mover, _Offset):
            self._keep_only((-1, -1))
            for index in range(self.first_swapped, self.num_blocks):
                self.mover.inner.restore(index - self.first_swapped)
        self.mover = None


class _Offset:
    """Maps model block indices onto the CudaMover's list of swapped blocks."""

    def __init__(self, inner: CudaMover, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def fetch(self, index: int) -> None:
        self.inner.fetch(index - self.offset)

    def wait(self, index: int) -> None:
        self.inner.wait(index - self.offset)

    def evict(self, index: int) -> None:
        self.inner.evict(index - self.offset)


def move_except_swapped(model: nn.Module, swapper: BlockSwapper, blocks: Sequence[nn.Module]) -> None:
    """Move `model` to the swapper's device, leaving the swapped blocks' frozen tensors in CPU memory (so
    the model never needs its full size on the device)."""
    if not swapper.active:
        model.to(swapper.device)
        return
    skip = {id(t) for b in list(blocks)[swapper.first_swapped :] for t in _frozen_tensors(b)}
    # Module._apply is what Module.to uses (it also handles devices whose tensors cannot share a Parameter).
    model._apply(lambda t: t if id(t) in skip else t.to(swapper.device))


def move_all_except_swapped(
    model: nn.Module, pairs: list[tuple[BlockSwapper, Sequence[nn.Module]]], device: torch.device
) -> None:
    """`move_except_swapped` for several block lists (FLUX's double and single blocks) at once."""
    skip = {
        id(t)
        for swapper, blocks in pairs
        if swapper.active
        for b in list(blocks)[swapper.first_swapped :]
        for t in _frozen_tensors(b)
    }
    model._apply(lambda t: t if id(t) in skip else t.to(device))

"""Gradient checkpointing whose saved inputs wait in CPU memory (kohya --cpu_offload_checkpointing).

Plain checkpointing keeps each block's inputs on the GPU until backward; with many blocks those inputs are
what is left of the activation memory. Here they are copied to (pinned) CPU memory without blocking the
host, and brought back for the recompute in backward. kohya moves every block's *outputs* to the CPU, so
activations and their gradients cross the bus twice each way with a blocking copy; here outputs and
gradients stay on the device and only the saved inputs travel, one copy out and one back.

The recompute restores the RNG state (dropout draws the same mask) and the autocast state of the forward,
so gradients equal the un-checkpointed ones exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, device, _anchor, *inputs):  # type: ignore[override]
        ctx.run, ctx.device = run, device
        ctx.grad_mask = [t.requires_grad for t in inputs]
        if device.type == "cpu":
            # Nothing to offload; saving through autograd keeps its check against later in-place changes.
            ctx.save_for_backward(*inputs)
            ctx.offloaded = None
        else:
            # Non-blocking device-to-host copies land in pinned memory; the stream orders the copy back.
            ctx.offloaded = [t.detach().to("cpu", non_blocking=True) for t in inputs]
        types = {"cpu", device.type}
        ctx.autocast = [_autocast_state(kind) for kind in sorted(types)]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        with torch.no_grad():
            return run(*inputs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        stored = ctx.saved_tensors if ctx.offloaded is None else ctx.offloaded
        inputs = [
            t.detach().to(ctx.device, non_blocking=True).requires_grad_(need)
            for t, need in zip(stored, ctx.grad_mask, strict=True)
        ]
        ctx.offloaded = None
        cuda = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if cuda:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with _restored_autocast(ctx.autocast):
                outputs = ctx.run(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, *(t.grad if t.requires_grad else None for t in inputs))


class _restored_autocast:
    def __init__(self, states: list[tuple[str, bool, torch.dtype]]) -> None:
        self.contexts = [torch.autocast(kind, dtype=dtype, enabled=on) for kind, on, dtype in states]

    def __enter__(self) -> None:
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc: object) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)


def offloaded_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` without keeping its activations: tensor arguments are held in CPU memory until
    backward, which recomputes `fn` on their device and backpropagates through it.

    `fn` returns a tensor or a tuple of tensors. Tensors may sit anywhere in `args` and `kwargs` (diffusers
    passes FLUX's rotary table as a tuple, attention masks and None positionally). Positional tensors and
    every tensor that requires grad are inputs of the recompute; a tensor nested in a container that needs
    no grad (a rotary table, a mask) is the same for every block, so it stays where it is rather than being
    copied out once per block. Other values are passed through. Parameters `fn` uses (a LoRA's) get their
    gradients even when no input requires grad. Without grad mode (sampling, validation) it is a plain call.
    """
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    leaves, spec = tree_flatten((args, kwargs))
    top = {id(a) for a in args if isinstance(a, torch.Tensor)}
    slots: dict[int, int] = {}  # id of a tensor -> its position among the recompute's inputs
    inputs: list[torch.Tensor] = []
    for leaf in leaves:
        if (
            isinstance(leaf, torch.Tensor)
            and (id(leaf) in top or leaf.requires_grad)
            and id(leaf) not in slots
        ):
            slots[id(leaf)] = len(inputs)
            inputs.append(leaf)
    if not inputs:
        return fn(*args, **kwargs)
    where = [slots.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None for leaf in leaves]

    def run(*tensor_args: torch.Tensor) -> Any:
        full = [leaf if slot is None else tensor_args[slot] for leaf, slot in zip(leaves, where, strict=True)]
        call_args, call_kwargs = tree_unflatten(full, spec)
        return fn(*call_args, **call_kwargs)

    # A leaf that requires grad makes the outputs part of the graph even when no input does, so the
    # recompute runs and the parameters inside `fn` get their gradients (reentrant checkpointing's pitfall).
    anchor = torch.empty(0, requires_grad=True)
    return _OffloadedCheckpoint.apply(run, inputs[0].device, anchor, *inputs)

"""Data parallel training through accelerate: the step's forward as a module that DDP can wrap.

The LoRA network's own `forward` is not what a step calls: its modules hook into the frozen UNet/DiT and text
encoders, and the step (library/training/step.py) runs the family's prediction. DDP needs a module whose
forward produces the loss and whose parameters are the trained ones, so `TrainingForward` runs the step with
the network as its only submodule. The frozen base is held as a plain attribute, not registered: DDP neither
broadcasts nor tracks its (multi-GB) weights; its reducer holds only the LoRA tensors, averages their
gradients in buckets (all-reduce per ~25 MB bucket, started while backward is still running) and skips
micro-steps run under `no_sync` (gradient accumulation).

One process: the module is used as is, nothing is wrapped and nothing is communicated.

DeepSpeed (`accelerate launch --use_deepspeed --zero_stage 2`): the same module and the optimizer are
prepared together, so DeepSpeed's engine holds the LoRA tensors alone and ZeRO-2 partitions their optimizer
state and gradients. We keep driving the loop: the engine is configured with our micro-batch size, one
accumulation step (the loop scales the loss and marks the last micro-step itself) and our gradient
clipping; `optimizer.step()` / `zero_grad()` become no-ops (the engine steps inside `accelerator.backward`
on the micro-step marked to sync) and our lr schedule keeps writing the lr into the wrapped optimizer's
param groups, which the engine's optimizer shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from library.data.sharing import ALONE, Share
from library.families.base import ModelBundle, ModelFamily

LossFn = Callable[..., torch.Tensor]  # diffusion_loss's signature


class TrainingForward(torch.nn.Module):
    """`forward(batch)` -> the micro-batch's mean loss, computed by `loss_fn` (the step's diffusion_loss)."""

    def __init__(
        self,
        network: torch.nn.Module,
        family: ModelFamily,
        bundle: ModelBundle,
        options: Any,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager],
        loss_fn: LossFn,
    ) -> None:
        super().__init__()
        self.network = network  # the only registered submodule: what DDP synchronises
        # Plain attributes (not nn.Module fields of this module): the frozen base stays out of DDP.
        self._step = (family, bundle, options, device, autocast, loss_fn)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        family, bundle, options, device, autocast, loss_fn = self._step
        return loss_fn(family, bundle, batch, options, device, autocast())


def _frozen_names(module: torch.nn.Module) -> list[str]:
    """Parameters without gradients and all buffers: DDP must not broadcast them (a third-party network may
    register the base layers it wraps) nor sync buffers every forward (LoRA has none that change)."""
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    return frozen + [name for name, _ in module.named_buffers()]


def uses_module_dropout(network: torch.nn.Module) -> bool:
    """--network_args module_dropout skips whole LoRA modules at random: their tensors get no gradient in
    that step, which DDP must be told to expect (find_unused_parameters costs a graph walk per step)."""
    return any(getattr(m, "module_dropout", None) for m in network.modules())


def data_parallel_forward(
    accelerator: Any,
    network: torch.nn.Module,
    family: ModelFamily,
    bundle: ModelBundle,
    options: Any,
    loss_fn: LossFn,
    *,
    optimizer: Any = None,
    batch_size: int = 1,
    max_grad_norm: float = 0.0,
) -> tuple[torch.nn.Module, Any]:
    """(the step's forward, the optimizer to step): the forward wrapped in DDP by `accelerator.prepare` when
    the launch has several processes; under DeepSpeed both prepared together (see the module docstring)."""
    forward = TrainingForward(
        network, family, bundle, options, accelerator.device, accelerator.autocast, loss_fn
    )
    if is_deepspeed(accelerator):
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = batch_size
        config["gradient_accumulation_steps"] = 1
        config["gradient_clipping"] = max_grad_norm or 0.0
        accelerator.gradient_accumulation_steps = 1
        return accelerator.prepare(forward, optimizer)
    if accelerator.num_processes == 1:
        return forward, optimizer
    from accelerate.utils import DistributedDataParallelKwargs

    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        forward, _frozen_names(forward)
    )
    # Set here rather than when the Accelerator is made: only now is the network known.
    accelerator.ddp_handler = DistributedDataParallelKwargs(
        find_unused_parameters=uses_module_dropout(network), broadcast_buffers=False
    )
    return accelerator.prepare(forward), optimizer


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def gradient_sync(accelerator: Any, forward: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Around a micro-step's forward and backward: `sync=False` (a micro-step before the optimizer step)
    keeps the gradients local, so only the last micro-step of an accumulation all-reduces (DeepSpeed: is
    not an accumulation boundary, so the engine neither reduces nor steps)."""
    if is_deepspeed(accelerator):
        return _deepspeed_boundary(accelerator, sync)
    if sync or not isinstance(forward, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return forward.no_sync()


@contextmanager
def _deepspeed_boundary(accelerator: Any, sync: bool) -> Iterator[None]:
    # accelerate's backward hands `sync_gradients` to the engine as the accumulation boundary.
    accelerator.gradient_state._set_sync_gradients(sync)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def process_share(accelerator: Any) -> Share:
    """This process's part of the launch, for the caches (library/data/sharing.py)."""
    world = accelerator.num_processes
    if world == 1:
        return ALONE

    def all_gather(value: Any) -> list[Any]:
        # Pickled objects: small records, or latents/text outputs on their way into every process's RAM.
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    return Share(rank=accelerator.process_index, world=world, all_gather=all_gather)

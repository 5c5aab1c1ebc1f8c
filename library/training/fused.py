"""--fused_backward_pass and --fused_optimizer_groups: optimizer steps inside backward.

Each LoRA tensor's gradient is used as soon as autograd has accumulated it (`register_post_accumulate_grad_hook`)
and freed right after, so the gradients of all parameters never exist at the same time. With
`--fused_backward_pass` every tensor steps on its own; with `--fused_optimizer_groups N` the tensors are cut
into N consecutive chunks (kohya: ceil(count / N) tensors each) and a chunk steps once all of its gradients
are in.

One optimizer, as in an unfused run, is stepped on a subset: its param groups are narrowed to the chunk for
the call and restored after. Its state is therefore keyed and saved exactly as unfused, so --save_state /
--resume work, and a state saved with or without the flags resumes the other way too. This is only correct
for optimizers whose update of a tensor reads nothing but that tensor's own state (FUSABLE); Prodigy,
D-Adaptation and schedule-free optimizers keep step-wide state, paged bitsandbytes ones synchronise on every
step() call, so they are refused.

Gradient clipping (--max_grad_norm) covers what steps together: each tensor alone with --fused_backward_pass
(kohya's fine-tune scripts do the same), each chunk with --fused_optimizer_groups (1 group = the global norm,
as unfused). The lr scheduler steps once per optimizer step in the loop, as unfused.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from library.training.optimizers import optimizer_class_path

log = logging.getLogger("loratrain")

# Optimizers whose per-tensor update depends only on that tensor's gradient and state.
FUSABLE = frozenset(
    {
        "torch.optim.AdamW",
        "torch.optim.Adam",
        "torch.optim.SGD",
        "transformers.optimization.Adafactor",
        "transformers.Adafactor",
        "lion_pytorch.Lion",
        "bitsandbytes.optim.AdamW8bit",
        "bitsandbytes.optim.AdamW",
        "bitsandbytes.optim.Lion8bit",
        "bitsandbytes.optim.SGD8bit",
    }
)
FUSABLE_NAMES = "AdamW, AdamW8bit, Adafactor, Lion, Lion8bit, SGDNesterov, SGDNesterov8bit, torch.optim.Adam"


def fused_flag(fused_backward_pass: bool, fused_optimizer_groups: int | None) -> str | None:
    """The flag in use (for messages), or None when neither is on."""
    if fused_backward_pass:
        return "--fused_backward_pass"
    if fused_optimizer_groups:
        return "--fused_optimizer_groups"
    return None


def fused_problems(
    fused_backward_pass: bool,
    fused_optimizer_groups: int | None,
    optimizer_type: str,
    gradient_accumulation_steps: int,
    mixed_precision: str,
) -> list[str]:
    """Everything that rules the fused modes out, found before any weights load."""
    if fused_optimizer_groups is not None and fused_optimizer_groups < 0:
        return [f"--fused_optimizer_groups must be 1 or more (0 = off), got {fused_optimizer_groups}"]
    flag = fused_flag(fused_backward_pass, fused_optimizer_groups)
    if flag is None:
        return []
    if fused_backward_pass and fused_optimizer_groups:
        return [
            "--fused_backward_pass and --fused_optimizer_groups exclude each other (one steps every tensor "
            "alone, the other in N groups); pick one"
        ]
    problems = []
    if gradient_accumulation_steps > 1:
        problems.append(
            f"{flag} steps the optimizer inside each backward, so gradients cannot be accumulated over "
            f"micro-batches; drop --gradient_accumulation_steps {gradient_accumulation_steps} (raise "
            "--train_batch_size instead) or drop the flag"
        )
    if mixed_precision == "fp16":
        problems.append(
            f"{flag}: --mixed_precision fp16 scales the loss, and the scaler must see every gradient before "
            "any tensor steps; use --mixed_precision bf16 (or no), or drop the flag"
        )
    if optimizer_class_path(optimizer_type) not in FUSABLE:
        problems.append(
            f"{flag}: --optimizer_type {optimizer_type} cannot step one tensor at a time (its update reads "
            f"state across all tensors, or it is paged or schedule-free); use one of {FUSABLE_NAMES}, "
            "or drop the flag"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append(
            f"{flag} runs on one process only (each rank would have to all-reduce inside backward); launch "
            "a single process or drop the flag"
        )
    return problems


def _clip(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """torch's clip_grad_norm_ (no host sync: the factor stays on the device); one tensor without its
    multi-tensor machinery, which costs more than the update itself on a LoRA-sized tensor."""
    if len(params) > 1:
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # skips tensors without a gradient
        return
    grad = params[0].grad
    if grad is not None:
        grad.mul_((max_norm / (torch.linalg.vector_norm(grad) + 1e-6)).clamp_(max=1.0))


class _Chunk:
    """Tensors that step together, with the slice of each param group they come from."""

    def __init__(self, members: list[tuple[dict, torch.nn.Parameter]]) -> None:
        self.params = [p for _, p in members]
        by_group: dict[int, tuple[dict, list]] = {}
        for group, p in members:
            by_group.setdefault(id(group), (group, []))[1].append(p)
        self.groups = list(by_group.values())
        self.count = 0  # gradients accumulated in this backward


class FusedOptimizer:
    """Wraps the (accelerate-prepared) optimizer: hooks step it per chunk during backward.

    `step()` (called by the loop after backward) steps what is left: chunks with some tensors that got no
    gradient this step (module dropout, a text-encoder layer whose output is unused). `zero_grad()` only
    drops what never stepped: every stepped gradient is freed at once. Everything else (state_dict, param_groups, ...)
    is the wrapped optimizer's.
    """

    clips_in_backward = True  # the loop must not clip: the gradients are gone when it would

    def __init__(self, optimizer: Any, tensors_per_chunk: int, max_grad_norm: float) -> None:
        self._wrapped = optimizer
        self._inner = getattr(optimizer, "optimizer", optimizer)  # unwraps accelerate's AcceleratedOptimizer
        self._max_grad_norm = max_grad_norm
        members = [
            (group, p) for group in self._inner.param_groups for p in group["params"] if p.requires_grad
        ]
        self._chunks = [
            _Chunk(members[i : i + tensors_per_chunk]) for i in range(0, len(members), tensors_per_chunk)
        ]
        self._pending: dict[int, _Chunk] = {}  # chunks holding gradients that have not stepped yet
        self._handles = []
        for chunk in self._chunks:
            for p in chunk.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook_for(chunk)))

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    def _hook_for(self, chunk: _Chunk):
        size = len(chunk.params)

        def hook(_param: torch.Tensor) -> None:
            chunk.count += 1
            if chunk.count == size:
                self._step_chunk(chunk)
            elif chunk.count == 1:
                self._pending[id(chunk)] = chunk

        return hook

    @torch.no_grad()
    def _step_chunk(self, chunk: _Chunk) -> None:
        if self._max_grad_norm:
            _clip(chunk.params, self._max_grad_norm)
        inner = self._inner
        all_groups = inner.param_groups
        originals = [group["params"] for group, _ in chunk.groups]
        try:
            for group, params in chunk.groups:
                group["params"] = params
            inner.param_groups = [group for group, _ in chunk.groups]
            inner.step()  # skips tensors whose gradient is None, as an unfused step does
        finally:
            inner.param_groups = all_groups
            for (group, _), params in zip(chunk.groups, originals, strict=True):
                group["params"] = params
        self._clear(chunk)

    def _clear(self, chunk: _Chunk) -> None:
        for p in chunk.params:
            p.grad = None
        chunk.count = 0
        self._pending.pop(id(chunk), None)

    def step(self, closure: Any = None) -> None:
        for chunk in list(self._pending.values()):
            self._step_chunk(chunk)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for chunk in list(self._pending.values()):
            self._clear(chunk)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __getattr__(self, name: str) -> Any:
        if name == "_wrapped":  # not set yet (copy, unpickling): no endless recursion
            raise AttributeError(name)
        return getattr(self._wrapped, name)


def fuse_optimizer(
    optimizer: Any,
    *,
    per_tensor: bool,
    groups: int | None,
    max_grad_norm: float,
) -> FusedOptimizer:
    """Hook `optimizer` into backward: every tensor alone (`per_tensor`) or in `groups` chunks."""
    count = sum(
        p.requires_grad for g in getattr(optimizer, "optimizer", optimizer).param_groups for p in g["params"]
    )
    size = 1 if per_tensor else max(1, math.ceil(count / max(1, groups or 1)))
    if max_grad_norm and size < count:
        log.info(
            "--max_grad_norm %s clips each %s gradient on its own (the global norm never exists when fused)",
            max_grad_norm,
            "LoRA tensor's" if size == 1 else "group's",
        )
    return FusedOptimizer(optimizer, size, max_grad_norm)

"""--full_bf16: bf16 LoRA parameters updated with stochastic rounding.

A bf16 value near 1.0 moves in steps of 2**-8, so an update smaller than half of that (lr x weight decay,
a late small-lr step) rounds back to the old value and is lost for good. The optimizer therefore steps on a
float32 view of each bf16 parameter (its state is created in float32), and the result is written back rounded
up or down at random, with probability proportional to the distance: unbiased, so many small steps add up to
what float32 would have done. The float32 copies live only during `step`; the parameters stay bf16.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_LOW_BITS = 1 << 16  # float32 bits below bf16's 7-bit mantissa
_KEEP_HIGH = -_LOW_BITS  # 0xFFFF0000 as int32


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` rounded to bf16, up or down at random with probability proportional to the distance (unbiased).

    Adding uniform random low bits to the float32 bit pattern then truncating rounds the magnitude up exactly
    when the random bits carry into bf16's last mantissa bit; the sign bit is untouched, so it is symmetric.
    """
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, _LOW_BITS, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & _KEEP_HIGH).view(torch.float32).to(torch.bfloat16)


def enable_stochastic_rounding(optimizer: Any, seed: int) -> None:
    """Make `optimizer.step()` update its bf16 parameters in float32 and write them back stochastically rounded.

    Patches the instance's `step` (call before an lr scheduler wraps it), so every caller, the Accelerate
    wrapper and the fused backward pass included, gets it. The rounding draws from its own generator seeded by
    `seed`, so the training noise stream is the same as without it.
    """
    original = optimizer.step
    generators: dict[torch.device, torch.Generator] = {}
    state_checked = False

    def generator_for(device: torch.device) -> torch.Generator:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    def step(_self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal state_checked
        halves = [
            (p, p.grad)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and p.dtype == torch.bfloat16
        ]
        for p, grad in halves:
            p.data = p.data.float()
            p.grad = grad.float()
        if not state_checked:
            # A resumed state was cast to the parameters' bf16 on load; the float32 step wants it float32.
            _upcast_state(optimizer, [p for p, _ in halves])
            state_checked = True
        try:
            return original(*args, **kwargs)
        finally:
            for p, grad in halves:
                p.data = stochastic_round_bf16(p.data, generator_for(p.device))
                p.grad = grad

    # A bound method: torch's lr schedulers wrap `step` through its `__func__`.
    optimizer.step = types.MethodType(step, optimizer)


def _upcast_state(optimizer: Any, params: list[torch.Tensor]) -> None:
    for p in params:
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.dtype != torch.float32
                and value.shape == p.shape
            ):
                state[key] = value.float()

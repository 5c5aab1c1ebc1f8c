"""A Linear forward that keeps the weight *parameter* for backward, not a view or a cast copy of it.

`F.linear` saves `weight.t()` (a view: it pins the storage the weight had at forward time) or, under
autocast, a cast copy. Both defeat the memory tricks here: fp8 weights would be kept upcast until backward,
and a block swapped out after its forward would keep its device memory alive through the saved view. This
forward saves the parameter itself and casts it again in backward, so backward reads whatever storage the
parameter points to by then (fp8 on the device, or the block fetched back by the swapper). Values equal
nn.Linear's: the same F.linear forward, the same matmul for the input gradient. Meant for frozen weights:
no weight or bias gradient is computed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class _WeightSavingLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        with torch.autocast(x.device.type, enabled=False):
            b = None if bias is None else bias.to(dtype)
            return F.linear(x.to(dtype), weight.to(dtype), b)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        grad_x = grad_out.to(ctx.dtype) @ weight.to(ctx.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype if weight.dtype.itemsize == 1 else torch.promote_types(x.dtype, weight.dtype)


def _forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    # The argument is called `input` like nn.Linear's, so hooks that read kwargs["input"] still find it.
    return _WeightSavingLinear.apply(input, module.weight, module.bias, _compute_dtype(input, module.weight))


def save_weight_not_view(linear: nn.Linear) -> bool:
    """Give `linear` the weight-saving forward (an instance attribute, so forward hooks still run); False
    when it already has one. Undo with `restore_forward`."""
    if "forward" in linear.__dict__:
        return False
    linear.forward = functools.partial(_forward, linear)  # type: ignore[method-assign]
    return True


def restore_forward(linear: nn.Linear) -> None:
    linear.__dict__.pop("forward", None)

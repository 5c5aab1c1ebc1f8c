"""int8 base weights (--quantize_base int8): frozen Linear layers computed as int8 x int8 -> int32.

Each quantized Linear keeps its weight as int8 with one float32 scale per output channel (symmetric absmax:
w ~ q * scale, scale = absmax / 127 rounded up to a bf16 number, so every weight is within half a step of
the original). Its forward quantizes the
activation per row (token) the same way at run time and multiplies with `torch._int_mm`, then rescales the
int32 sums in float32 and returns the compute dtype (the autocast dtype under autocast, else the input's).
This is the dynamic-activation int8 path OneTrainer takes for speed on consumer GPUs; on CPU `_int_mm` takes
any shape. Where it does not fit (CUDA wants more than 16 rows and both feature counts multiples of 8) the
layer multiplies by its dequantized weight instead, which gives the weight-only-int8 numbers.

Backward computes only the input gradient, `grad_out @ (q * scale)` in the compute dtype; the autograd
function saves the int8 weight parameter and the scale buffer themselves, never a dequantized copy (and,
like library/memory/linear.py, reads them at backward time, so block swapping can move them meanwhile).

Which layers: every frozen `nn.Linear` for which `include(name, linear)` holds, except those whose in- or
out-features are not a multiple of 8 or whose in-features are under 16; those stay as loaded (they would
always take the fallback on CUDA, and a dot product of a few terms gains nothing). The module stays an
`nn.Linear` and only its `forward` is replaced, so LoRA's forward hooks (networks/lora_module.py) still run.
Code that casts activations to a weight's dtype would cast to int8: apply this to the denoisers only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SCALE_BUFFER = "weight_scale"  # float32 [out_features], registered on each quantized Linear
_QMAX = 127  # symmetric: -128 is never used, so negation cannot overflow
_MIN_IN_FEATURES = 16


def quantize_base_problems(quantize_base: str | None, fp8_base: bool, fp8_base_unet: bool) -> list[str]:
    """--quantize_base with an fp8 flag: both decide how the same weights are stored."""
    if not quantize_base:
        return []
    return [
        f"--quantize_base {quantize_base} and {flag}: both choose how the base weights are stored; "
        f"remove one of them"
        for flag, on in (("--fp8_base", fp8_base), ("--fp8_base_unet", fp8_base_unet))
        if on
    ]


def _round_up_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 number >= x, for float32 x >= 0 (kept in float32): clear the low 16 bits of
    x + one bfloat16 step minus one."""
    return ((x.view(torch.int32) + 0xFFFF) & -0x10000).view(torch.float32)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], float32 scale [out]) with weight ~ q * scale[:, None], per output channel.

    Each scale is absmax / 127 rounded up to a bfloat16 number (at most 0.8% more; |q| stays <= 127), so
    a bf16 dequantization is exact: q * scale needs 15 significant bits, rounded once into bf16."""
    w = weight.detach().to(torch.float32)
    scale = _round_up_to_bfloat16(w.abs().amax(dim=1) / _QMAX)
    # An all-zero row has scale 0: divide by 1 instead (it stays 0) rather than by 0.
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-_QMAX, _QMAX)
    return q.to(torch.int8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale rounded once into `dtype`. bf16 multiplies in bf16 (the scales are bf16 numbers, so the
    product is the same; 2 bytes per weight instead of a float32 copy); fp16 goes through float32, as its
    range may not hold a scale."""
    if dtype == torch.bfloat16:
        return q.to(dtype).mul_(scale.to(dtype)[:, None])
    return q.to(torch.float32).mul_(scale[:, None]).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [rows, k], float32 scale [rows, 1]) for a 2-D activation, one absmax scale per row."""
    x32 = x.to(torch.float32)
    absmax = torch.linalg.vector_norm(x32, float("inf"), dim=1, keepdim=True)
    # Few passes over the activation (this runs every step): |x| * 127 / absmax cannot pass 127.5, so
    # rounding alone stays in range; an all-zero row multiplies by 0.
    q = (x32 * torch.where(absmax > 0, _QMAX / absmax, 0.0)).round_()
    return q.to(torch.int8), absmax / _QMAX


def int_mm_fits(device: torch.device, rows: int, k: int, n: int) -> bool:
    """Whether `torch._int_mm` takes an [rows, k] x [k, n] product on `device` (CPU: any shape)."""
    if not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and rows > 16 and k % 8 == 0 and n % 8 == 0


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias, dtype):  # type: ignore[override]
        ctx.save_for_backward(q, scale)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        n, k = q.shape
        if x.shape[-1] != k:  # reshape below would accept any multiple of k
            raise RuntimeError(f"int8 Linear: input has {x.shape[-1]} features, the layer takes {k}")
        x2 = x.reshape(-1, k)
        with torch.autocast(x.device.type, enabled=False):
            if int_mm_fits(x.device, x2.shape[0], k, n):
                xq, x_scale = quantize_rows(x2)
                out = torch._int_mm(xq, q.t()).to(torch.float32)
                out.mul_(x_scale).mul_(scale)
                if bias is not None:
                    out.add_(bias.to(torch.float32))
                out = out.to(dtype)
            else:
                b = None if bias is None else bias.to(dtype)
                out = F.linear(x2.to(dtype), dequantize_weight(q, scale, dtype), b)
        return out.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        q, scale = ctx.saved_tensors
        grad_x = grad_out.to(ctx.dtype) @ dequantize_weight(q, scale, ctx.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"int8 Linear: the input must be floating point, got {x.dtype}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    # `input`, as nn.Linear names it, so hooks reading kwargs["input"] still find it.
    scale = getattr(module, SCALE_BUFFER)
    return _Int8Linear.apply(input, module.weight, scale, module.bias, _compute_dtype(input))


def _unsuited(linear: nn.Linear) -> str | None:
    if linear.in_features % 8 or linear.out_features % 8:
        return "features not a multiple of 8"
    if linear.in_features < _MIN_IN_FEATURES:
        return f"fewer than {_MIN_IN_FEATURES} in-features"
    return None


@dataclass
class Int8Handle:
    """What `quantize_int8` did: the quantized Linear modules and their original weight dtypes, the layers
    left as they were (name and why), and the weight bytes before and after. `remove()` undoes it."""

    modules: list[nn.Linear] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def remove(self) -> None:
        """Float weights again (the values keep their int8 rounding) and nn.Linear's own forward."""
        for module, dtype in zip(self.modules, self.dtypes, strict=True):
            module.__dict__.pop("forward", None)
            scale = module._buffers.pop(SCALE_BUFFER)
            module.weight.data = dequantize_weight(module.weight.data, scale, dtype)
        self.modules, self.dtypes = [], []


def quantize_int8(module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None) -> Int8Handle:
    """Store every frozen `nn.Linear` inside `module` (for which `include(name, linear)` is true, default
    all, and whose shape suits: see the module doc) as int8 weights with per-output-channel scales, computed
    with dynamically quantized int8 activations. Apply before LoRA is attached (like fp8, on frozen weights).

    Raises ValueError for a trainable weight or one stored in one byte already (fp8 or int8).
    """
    handle = Int8Handle()
    for name, linear in module.named_modules():
        if not isinstance(linear, nn.Linear) or (include is not None and not include(name, linear)):
            continue
        weight = linear.weight
        if weight.requires_grad:
            raise ValueError(f"{name}: int8 storage is for frozen weights; call requires_grad_(False) first")
        if weight.dtype.itemsize == 1:
            raise ValueError(f"{name}: weights in {weight.dtype} are quantized already")
        if reason := _unsuited(linear):
            handle.skipped.append((name, reason))
            continue
        q, scale = quantize_weight(weight)
        handle.modules.append(linear)
        handle.dtypes.append(weight.dtype)
        handle.bytes_before += weight.numel() * weight.element_size()
        handle.bytes_after += q.numel() + scale.numel() * scale.element_size()
        weight.data = q
        linear.register_buffer(SCALE_BUFFER, scale)
        linear.forward = functools.partial(_forward, linear)  # type: ignore[method-assign]
    return handle

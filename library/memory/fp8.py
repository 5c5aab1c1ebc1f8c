"""fp8 base weights (kohya --fp8_base / --fp8_base_unet): frozen Linear weights stored as float8_e4m3fn.

Each stored Linear computes in its input's dtype (the autocast dtype under autocast): the fp8 weight is
upcast for the matmul and dropped again, and backward upcasts it once more rather than keeping the upcast
copy alive between forward and backward (library/memory/linear.py), so the weights cost one byte per
element throughout. Biases, norms and embeddings keep their dtype. The module stays an `nn.Linear` and only
its `forward` is replaced, so forward hooks (the LoRA modules of networks/lora.py) work on top unchanged.

Code that casts its activations to a weight's dtype breaks with fp8 weights: transformers' T5 feed-forward
casts its hidden states to `wo.weight.dtype`. kohya patches that forward for --fp8_base; a family storing
T5 in fp8 must do the same, or leave `wo` out through `include`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from library.errors import UserError
from library.memory.linear import restore_forward, save_weight_not_view

FP8_FLAGS = ("--fp8_base", "--fp8_base_unet")


def fp8_dtype() -> torch.dtype | None:
    """torch.float8_e4m3fn, or None when this torch build has no float8 (before 2.1)."""
    return getattr(torch, "float8_e4m3fn", None)


def fp8_problems(fp8_base: bool, fp8_base_unet: bool, mixed_precision: str) -> list[str]:
    """kohya's preconditions for the fp8 flags, one line each (empty when fine or when neither is set)."""
    used = [flag for flag, on in zip(FP8_FLAGS, (fp8_base, fp8_base_unet), strict=True) if on]
    if not used:
        return []
    problems = []
    if fp8_dtype() is None:
        problems.append(
            f"{' and '.join(used)}: this torch ({torch.__version__}) has no float8 dtype; install torch >= 2.1 "
            "or drop the flag"
        )
    if mixed_precision not in ("fp16", "bf16"):
        problems.append(
            f"{' and '.join(used)} {'needs' if len(used) == 1 else 'need'} --mixed_precision bf16 or fp16 (fp8 weights are computed in the mixed "
            "precision dtype)"
        )
    return problems


@dataclass
class Fp8Handle:
    """The Linear modules `store_fp8` changed and their original weight dtypes; `remove()` undoes it."""

    modules: list[nn.Linear] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)

    def remove(self) -> None:
        """Restore the original forward and dtype (the values keep their fp8 rounding)."""
        for module, dtype in zip(self.modules, self.dtypes, strict=True):
            restore_forward(module)
            module.weight.data = module.weight.data.to(dtype)
        self.modules, self.dtypes = [], []


def store_fp8(module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None) -> Fp8Handle:
    """Store the weights of every frozen `nn.Linear` inside `module` (for which `include(name, linear)` is
    true, default all) as float8_e4m3fn; weights already in that dtype are kept as loaded (kohya).

    Raises UserError when torch has no float8, ValueError for a trainable weight or another fp8 format.
    """
    dtype = fp8_dtype()
    if dtype is None:
        raise UserError(
            f"fp8 weights: this torch ({torch.__version__}) has no float8 dtype; install torch >= 2.1"
        )
    handle = Fp8Handle()
    for name, linear in module.named_modules():
        if not isinstance(linear, nn.Linear) or (include is not None and not include(name, linear)):
            continue
        weight = linear.weight
        if weight.requires_grad:
            raise ValueError(f"{name}: fp8 storage is for frozen weights; call requires_grad_(False) first")
        if weight.dtype.itemsize == 1 and weight.dtype != dtype:
            raise ValueError(f"{name}: weights in {weight.dtype} are not supported, only {dtype}")
        handle.modules.append(linear)
        handle.dtypes.append(weight.dtype if weight.dtype != dtype else torch.bfloat16)
        weight.data = weight.data.to(dtype)
        save_weight_not_view(linear)
    return handle

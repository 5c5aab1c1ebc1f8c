"""One LoRA over several Linears that the file format stores as one fused Linear.

FLUX.1's BFL layout fuses what diffusers splits: a double block's `img_attn.qkv` is diffusers' to_q/to_k/to_v,
a single block's `linear1` is to_q/to_k/to_v/proj_mlp. kohya's files hold one LoRA per fused module (down
[r, in], up [sum of outs, r]); `GroupedLoRAModule` trains exactly that on the split model: every part's hook
adds its rows of `up @ down(x)`, with `down(x)` computed once per forward for all parts (they share the input).

With `split=True` (kohya's split_qkv) each part has its own rank-r down and up; they are stored as the file
holds them: down stacked [n*r, in], up block-diagonal [sum of outs, n*r], alpha x n, so that every loader's
alpha/rank scale equals the training scale (kohya keeps alpha unchanged there, which shrinks the delta n-fold).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from networks.lora_module import LoRAModule, _refresh_scale_after_load


def _check_block_diagonal(module: nn.Module, _incompatible_keys: object) -> None:
    module.check_block_diagonal()  # type: ignore[operator]


class GroupedLoRAModule(LoRAModule):
    """A fused LoRA hooked on each of `org_modules` (Linears with one input size); `lora_dim` is per part."""

    def __init__(
        self,
        lora_name: str,
        org_modules: Sequence[nn.Module],
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        *,
        split: bool = False,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        te_index: int | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not all(isinstance(m, nn.Linear) for m in org_modules):
            raise TypeError(f"{lora_name}: a grouped LoRA wraps Linears only")
        in_features = {m.in_features for m in org_modules}  # type: ignore[union-attr]
        if len(in_features) != 1:
            raise ValueError(f"{lora_name}: the grouped Linears differ in input size {sorted(in_features)}")
        outs = [int(m.out_features) for m in org_modules]  # type: ignore[union-attr]
        parts = len(outs)
        self.lora_name = lora_name
        self.te_index = te_index
        self.split = split and parts > 1
        self.lora_dim = lora_dim * parts if self.split else lora_dim
        self.lora_down: nn.Module = nn.Linear(in_features.pop(), self.lora_dim, bias=False)
        self.lora_up: nn.Module = nn.Linear(self.lora_dim, sum(outs), bias=False)
        alpha_value = float(alpha) if alpha else float(lora_dim)
        if self.split:
            alpha_value *= parts  # keeps alpha / (stored rank) equal to the per-part alpha / r
        self.register_buffer("alpha", torch.tensor(alpha_value))
        self.scale = alpha_value / self.lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5**0.5)
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        starts = [sum(outs[:i]) for i in range(parts)]
        self._rows = [slice(s, s + o) for s, o in zip(starts, outs, strict=True)]
        self._cols = [
            slice(i * lora_dim, (i + 1) * lora_dim) if self.split else slice(None) for i in range(parts)
        ]
        self._orgs: tuple[nn.Module, ...] = tuple(org_modules)  # a tuple keeps them out of state_dict
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (input, shared down output or None when module dropout skips this forward, scale, parts still due)
        self._pending: tuple[torch.Tensor, torch.Tensor | None, float, set[int]] | None = None
        self.register_load_state_dict_post_hook(_refresh_scale_after_load)
        if self.split:
            self.register_load_state_dict_post_hook(_check_block_diagonal)

    @property
    def org_module(self) -> nn.Module:
        return self._orgs[0]

    @property
    def org_modules(self) -> tuple[nn.Module, ...]:
        return self._orgs

    @property
    def is_applied(self) -> bool:
        return bool(self._handles)

    def apply_to(self) -> None:
        if not self._handles:
            self._handles = [
                m.register_forward_hook(functools.partial(self._part_hook, i), with_kwargs=True)
                for i, m in enumerate(self._orgs)
            ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = None

    def _shared_down(self, x: torch.Tensor, part: int) -> tuple[torch.Tensor | None, float]:
        """down(x) (after dropout) and the scale; the parts of one forward share both (same input object)."""
        pending = self._pending
        if pending is not None and pending[0] is x and part in pending[3]:
            pending[3].discard(part)
            if not pending[3]:
                self._pending = None  # all parts served: do not keep the activation alive
            return pending[1], pending[2]
        lx: torch.Tensor | None = None
        scale = self.scale
        if not (self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout):
            lx = self.lora_down(x.to(self.lora_down.weight.dtype))
            if self.training:
                if self.dropout:
                    lx = F.dropout(lx, p=self.dropout)
                if self.rank_dropout:
                    lx = lx * self._rank_mask(lx)
                    scale = scale / (1.0 - self.rank_dropout)
        rest = set(range(len(self._orgs))) - {part}
        self._pending = (x, lx, scale, rest) if rest else None
        return lx, scale

    def _part_hook(
        self, part: int, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor | None:
        if self.multiplier == 0:
            return None
        x = args[0] if args else kwargs["input"]
        lx, scale = self._shared_down(x, part)
        if lx is None:
            return None
        up = self.lora_up.weight[self._rows[part], self._cols[part]]
        delta = F.linear(lx[..., self._cols[part]], up) * (self.multiplier * scale)
        return output + delta.to(output.dtype)

    def off_diagonal(self) -> torch.Tensor:
        """Boolean mask of the up entries a split module never uses (all False when not split)."""
        mask = torch.ones_like(self.lora_up.weight, dtype=torch.bool) if self.split else None
        if mask is None:
            return torch.zeros_like(self.lora_up.weight, dtype=torch.bool)
        for rows, cols in zip(self._rows, self._cols, strict=True):
            mask[rows, cols] = False
        return mask

    def check_block_diagonal(self) -> None:
        if self.split and bool(self.lora_up.weight[self.off_diagonal()].any()):
            raise UserError(
                f"{self.lora_name}: lora_up is not block-diagonal, so it cannot be trained with split_qkv=True; "
                "remove split_qkv from --network_args to continue this LoRA fused"
            )


def make_lora_module(
    name: str,
    parts: Sequence[nn.Module],
    multiplier: float,
    rank: int,
    alpha: float | None,
    *,
    split: bool,
    from_file: bool,
    **kwargs: object,
) -> LoRAModule:
    """A plain LoRAModule for one module, else a GroupedLoRAModule. From a file, `rank`/`alpha` are the stored
    (fused) ones: a split module takes rank/n per part and alpha/n when the stored rank divides by n."""
    if len(parts) == 1:
        return LoRAModule(name, parts[0], multiplier, rank, alpha, **kwargs)  # type: ignore[arg-type]
    n = len(parts)
    if split and from_file:
        split = rank % n == 0
        if split:
            rank, alpha = rank // n, (alpha / n if alpha else alpha)
    return GroupedLoRAModule(name, parts, multiplier, rank, alpha, split=split, **kwargs)  # type: ignore[arg-type]

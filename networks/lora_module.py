"""One LoRA / LoCon module: a forward hook adding `up(down(x)) * multiplier * alpha/rank` to a frozen
Linear or Conv2d (the base weights are never touched, so applying is undoable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _refresh_scale_after_load(module: nn.Module, _incompatible_keys: object) -> None:
    # A module-level function (not a lambda) keeps LoRAModule picklable.
    module.refresh_scale()  # type: ignore[operator]


class LoRAModule(nn.Module):
    """Low-rank update of one frozen Linear or Conv2d (down keeps the conv's kernel/stride/padding, up is 1x1)."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        te_index: int | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.te_index = te_index  # None for UNet modules; used for per-text-encoder learning rates
        if isinstance(org_module, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(
                org_module.in_channels,
                lora_dim,
                org_module.kernel_size,  # type: ignore[arg-type]
                org_module.stride,  # type: ignore[arg-type]
                org_module.padding,  # type: ignore[arg-type]
                dilation=org_module.dilation,  # type: ignore[arg-type]
                bias=False,
            )
            self.lora_up: nn.Module = nn.Conv2d(lora_dim, org_module.out_channels, 1, 1, bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA wraps Linear or Conv2d, not {type(org_module).__name__}")
        # kohya: alpha None or 0 means alpha = rank (scale 1); stored as a 0-dim float buffer.
        alpha_value = float(alpha) if alpha else float(lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha_value))
        self.scale = alpha_value / lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5**0.5)
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # A tuple keeps the base module out of this module's children (and out of state_dict/.to()).
        self._org: tuple[nn.Module] = (org_module,)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        # Loading a state dict replaces the alpha buffer; keep the cached float scale in step with it.
        self.register_load_state_dict_post_hook(_refresh_scale_after_load)

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def is_applied(self) -> bool:
        return self._handle is not None

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha) / self.lora_dim

    def apply_to(self) -> None:
        if self._handle is None:
            self._handle = self.org_module.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _rank_mask(self, lx: torch.Tensor) -> torch.Tensor:
        keep = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
        if isinstance(self.lora_down, nn.Conv2d):  # rank is dim 1 of [B, r, H, W]
            shape = (lx.size(0), self.lora_dim) + (1,) * (lx.dim() - 2)
        else:  # rank is the last dim of [B, ..., r]
            shape = (lx.size(0),) + (1,) * (lx.dim() - 2) + (self.lora_dim,)
        return keep.view(shape).to(lx.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA contribution for input `x`, in the LoRA parameters' dtype."""
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale
        if self.training:
            if self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                lx = lx * self._rank_mask(lx)
                scale = scale / (1.0 - self.rank_dropout)  # keep the expected update unchanged
        return self.lora_up(lx) * (self.multiplier * scale)

    def _hook(
        self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor | None:
        # Multiplier 0 (e.g. the base-model pass of differential output preservation) costs nothing.
        if self.multiplier == 0:
            return None
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return None
        x = args[0] if args else kwargs["input"]
        return output + self.delta(x).to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Full ΔW = up @ down * scale in the base weight's layout (without the multiplier)."""
        return lora_delta(self.lora_down.weight, self.lora_up.weight, self.scale)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = up @ down * scale from a LoRA's factors (Linear, 1x1 or k x k LoCon conv), as kohya computes it."""
    if down.dim() == 2:
        w = up.flatten(1) @ down  # a 1x1-conv up over a Linear down (kohya's linear/conv mismatch) flattens
    elif down.shape[2:] == (1, 1):
        w = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    else:  # k x k conv followed by 1x1: compose by convolving the down kernel with the up matrix
        w = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return w * scale

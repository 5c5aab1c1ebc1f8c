"""LoRA / LoCon network in kohya's file layout; usable as `--network_module networks.lora`.

One `LoRAModule` per wrapped Linear/Conv2d adds `up(down(x)) * multiplier * alpha/rank` to the frozen
module's output through a forward hook, so applying is undoable and the base weights are never touched.
Which modules are wrapped and how they are named comes from `networks.targets` (data per family); where
the file format fuses several Linears into one module (FLUX's qkv), one `GroupedLoRAModule` hooks them all.
The module-level `create_network` / `create_network_from_weights` keep kohya's signatures so a trainer can
call this module and third-party ones (e.g. LyCORIS) the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from library.errors import UserError
from networks.flux_args import family_arg_problems
from networks.key_aliases import alias_map, to_kohya_keys
from networks.lora_args import NETWORK_ARGS, LoRAOptions, family_problems, lora_options, parse_network_args
from networks.lora_blocks import BlockPlan, block_arg_problems, block_index, block_plan
from networks.lora_file import load_lora_file
from networks.lora_group import make_lora_module
from networks.lora_module import LoRAModule
from networks.targets import Target, TargetTable, find_targets, select_table

__all__ = [
    "NETWORK_ARGS",
    "LoRAModule",
    "LoRANetwork",
    "create_network",
    "create_network_from_weights",
    "family_problems",
    "parse_network_args",
]

logger = logging.getLogger(__name__)
WEIGHTS_FLAG = "--network_weights"


def _as_list(text_encoder: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    return [te for te in text_encoder if te is not None]


def _preview(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


class LoRANetwork(nn.Module):
    """All LoRA modules for one model; submodules are named by kohya key so `state_dict()` is the file layout."""

    def __init__(
        self,
        text_encoders: nn.Module | Sequence[nn.Module] | None,
        unet: nn.Module | None,
        *,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        options: LoRAOptions | None = None,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        opts = options or LoRAOptions()
        text_encoder_list = _as_list(text_encoders)
        self.table: TargetTable = select_table(unet, text_encoder_list)
        wrong_family = family_arg_problems(opts.given(), self.table.name)
        wrong_family += block_arg_problems(opts.given(), self.table.name)
        if wrong_family:
            raise UserError(*wrong_family)
        self._options = opts
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim = opts.conv_dim or None  # conv_dim=0 means no LoCon
        self.conv_alpha = (
            (opts.conv_alpha if opts.conv_alpha is not None else 1.0) if self.conv_lora_dim else None
        )
        # With modules_dim (a file's shapes) only the plan's lr weights matter.
        self.block_plan: BlockPlan | None = block_plan(
            self.table.name, opts, lora_dim, alpha, self.conv_lora_dim, self.conv_alpha
        )
        self.loraplus_lr_ratio = opts.loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = opts.loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = opts.loraplus_text_encoder_lr_ratio
        # Plain lists (not ModuleList) so parameters are registered once, under the kohya name below.
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []

        from_weights = modules_dim is not None
        block_conv = self.block_plan is not None and self.block_plan.conv_dims is not None
        candidates = find_targets(
            self.table,
            unet,
            text_encoder_list,
            include_conv_classes=from_weights or bool(self.conv_lora_dim) or block_conv,
        )
        # Other tools' spellings of these modules' keys, for load_weights (kept out of the state dict).
        self.key_aliases = alias_map(candidates)
        for target in candidates:
            shape = self._shape_for(target, modules_dim, modules_alpha)
            if shape is None:
                continue
            lora = self._new_module(target, shape[0], shape[1], from_weights)
            (self.text_encoder_loras if target.component == "text_encoder" else self.unet_loras).append(lora)
            self.add_module(target.name, lora)
        logger.info(
            "LoRA (%s table): %d text encoder modules, %d UNet modules",
            self.table.name,
            len(self.text_encoder_loras),
            len(self.unet_loras),
        )
        if opts.verbose:
            for lora in self.all_loras:
                logger.info("  %-60s rank %d, alpha %g", lora.lora_name, lora.lora_dim, float(lora.alpha))

    def _new_module(self, target: Target, rank: int, alpha: float | None, from_weights: bool) -> LoRAModule:
        """The module for one target; variants (networks.dylora) override this."""
        opts = self._options
        return make_lora_module(
            target.name,
            target.parts or (target.module,),
            self.multiplier,
            rank,
            alpha,
            split=bool(opts.split_qkv),
            from_file=from_weights,
            dropout=opts.dropout,
            rank_dropout=opts.rank_dropout,
            module_dropout=opts.module_dropout,
            te_index=target.te_index if target.component == "text_encoder" else None,
        )

    def _shape_for(
        self, target: Target, modules_dim: Mapping[str, int] | None, modules_alpha: Mapping[str, float] | None
    ) -> tuple[int, float | None] | None:
        """(rank, alpha) for a candidate, or None when it gets no module."""
        if modules_dim is not None:
            if target.name not in modules_dim:
                return None
            rank = modules_dim[target.name]
            # Files without alpha mean alpha = rank (what every consumer assumes).
            return rank, (modules_alpha or {}).get(target.name, float(rank))
        if self.block_plan is not None and target.component == "unet":
            return self.block_plan.rank_for(target.name, conv=target.kind == "conv")
        if target.kind == "conv":
            return (self.conv_lora_dim, self.conv_alpha) if self.conv_lora_dim else None
        # As kohya: Linear and 1x1 convs get the base rank, even inside the LoCon classes.
        rank = self.table.rank_rule(target, self._options) if self.table.rank_rule else None
        if rank == 0:
            return None
        return (self.lora_dim if rank is None else rank), self.alpha

    @property
    def all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def apply_to(
        self,
        text_encoders: nn.Module | Sequence[nn.Module] | None,
        unet: nn.Module | None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Hook every module in. Parts not applied are dropped from the network (and from its state dict).

        The modules were bound to the models given at construction; the arguments mirror kohya's API.
        """
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.all_loras:
            lora.apply_to()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.remove()
            del self._modules[lora.lora_name]

    def remove(self) -> None:
        """Unhook every module; the base models compute exactly what they did before `apply_to`."""
        for lora in self.all_loras:
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras:
            lora.multiplier = multiplier

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer param groups and their log names ("textencoder", "unet", "... plus" for LoRA+ up weights).

        `text_encoder_lr` may list one lr per text encoder (kohya `--text_encoder_lr` nargs); a missing
        entry reuses the last one. Groups with lr 0 are dropped and their parameters frozen.
        """
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []
        names: list[str] = []
        if self.text_encoder_loras:
            ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
            te_lrs = self._text_encoder_lrs(text_encoder_lr, default_lr)
            if len(set(te_lrs.values())) <= 1:
                only_lr = next(iter(te_lrs.values()))
                self._add_groups(groups, names, self.text_encoder_loras, only_lr, ratio, "textencoder")
            else:  # differing per-encoder lrs need one group each
                for index, lr in te_lrs.items():
                    loras = [lo for lo in self.text_encoder_loras if lo.te_index == index]
                    self._add_groups(groups, names, loras, lr, ratio, f"textencoder{index + 1}")
        if self.unet_loras:
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            lr = unet_lr if unet_lr is not None else default_lr
            weights = self.block_plan.lr_weights if self.block_plan is not None else None
            if weights is None:
                self._add_groups(groups, names, self.unet_loras, lr, ratio, "unet")
            else:  # kohya's block-wise lr: one group per block, logged as unet_block<N>
                by_block: dict[int, list[LoRAModule]] = {}
                for lora in self.unet_loras:
                    by_block.setdefault(block_index(lora.lora_name, self.block_plan.sdxl), []).append(lora)
                for index, loras in by_block.items():
                    self._add_groups(groups, names, loras, lr * weights[index], ratio, f"unet_block{index}")
        return groups, names

    def _text_encoder_lrs(
        self, text_encoder_lr: float | Sequence[float] | None, default_lr: float
    ) -> dict[int, float]:
        if text_encoder_lr is None or (isinstance(text_encoder_lr, Sequence) and len(text_encoder_lr) == 0):
            given: list[float] = [default_lr]
        elif isinstance(text_encoder_lr, Sequence):
            given = [float(v) for v in text_encoder_lr]
        else:
            given = [float(text_encoder_lr)]
        indices = sorted({lo.te_index or 0 for lo in self.text_encoder_loras})
        return {i: given[min(i, len(given) - 1)] for i in indices}

    @staticmethod
    def _add_groups(
        groups: list[dict[str, Any]],
        names: list[str],
        loras: list[LoRAModule],
        lr: float,
        loraplus_ratio: float | None,
        label: str,
    ) -> None:
        base = [p for lo in loras for p in lo.lora_down.parameters()]
        ups = [p for lo in loras for p in lo.lora_up.parameters()]
        if loraplus_ratio:
            parts = [(base, lr, label), (ups, lr * loraplus_ratio, f"{label} plus")]
        else:
            parts = [(base + ups, lr, label)]
        for params, group_lr, name in parts:
            if not params:
                continue
            if group_lr == 0:  # an lr of 0 means "do not train this part"
                for p in params:
                    p.requires_grad_(False)
                continue
            groups.append({"params": params, "lr": group_lr})
            names.append(name)

    def load_weights(
        self, path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Load a kohya LoRA file (or state dict) into this network; returns (missing, unexpected) keys.

        strict: any missing/unexpected key raises a UserError. Shape mismatches always raise. A module whose
        alpha is absent from the file gets alpha = rank, which is how every consumer reads such files.
        """
        if isinstance(path_or_state_dict, Mapping):
            state = dict(path_or_state_dict)
            where = f"{WEIGHTS_FLAG} (state dict)"
        else:
            state = load_lora_file(path_or_state_dict, flag=WEIGHTS_FLAG)[0]
            where = f"{WEIGHTS_FLAG} {path_or_state_dict}"
        state = to_kohya_keys(state, self.key_aliases)
        own = self.state_dict()
        for lora in self.all_loras:  # absent alpha -> rank
            key = f"{lora.lora_name}.alpha"
            if key not in state and f"{lora.lora_name}.lora_down.weight" in state:
                state[key] = torch.tensor(float(lora.lora_dim))
        for key, value in state.items():  # some tools store alpha as shape [1]
            if key.endswith(".alpha") and key in own and value.numel() == 1:
                state[key] = value.reshape(())
        missing = sorted(own.keys() - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        wrong = [
            f"{k}: file {list(state[k].shape)} vs network {list(own[k].shape)}"
            for k in sorted(own.keys() & state.keys())
            if state[k].shape != own[k].shape
        ]
        if wrong or (strict and (missing or unexpected)):
            example = (wrong or missing or unexpected)[0]
            kind = "wrong shape" if wrong else "missing" if missing else "unexpected"
            # One line: the counts, the first example and the fix (kohya prints every key).
            raise UserError(
                f"{where}: does not match this network ({len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(wrong)} wrong shape; e.g. {kind}: {example}); use a LoRA made for this model with the same "
                "network_dim/conv_dim, or add --dim_from_weights to take the shapes from the file"
            )
        if missing or unexpected:
            logger.warning(
                "%s: %d keys missing, %d unexpected (loaded the rest): %s",
                where,
                len(missing),
                len(unexpected),
                _preview(missing + unexpected),
            )
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return missing, unexpected

    def state_dict_for_save(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Detached contiguous CPU copies, cast to `dtype` when given, alpha included (as kohya)."""
        return {
            k: v.detach().to(device="cpu", dtype=dtype or v.dtype, copy=True).contiguous()
            for k, v in self.state_dict().items()
        }

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | None = None
    ) -> tuple[int, float, float]:
        """kohya `--scale_weight_norms`: shrink up/down so each ‖ΔW‖ <= max_norm_value.

        Returns (modules scaled, mean norm, max norm) after scaling, with one host sync for all modules.
        `device` is accepted for kohya's signature; the tensors stay where they are.
        """
        count, mean, top = self.max_norm_stats(max_norm_value).tolist()
        return int(count), mean, top

    @torch.no_grad()
    def max_norm_stats(self, max_norm_value: float) -> torch.Tensor:
        """Like apply_max_norm_regularization, but the statistics stay a device tensor (no host sync)."""
        loras = self.all_loras
        if not loras:
            return torch.zeros(3)
        norms, scaled = [], []
        for lora in loras:
            norm = lora.delta_weight().float().norm().clamp(min=max_norm_value / 2)
            ratio = norm.clamp(max=max_norm_value) / norm
            # Parameters rather than .weight: DyLoRA keeps its weights as rank chunks.
            for param in (*lora.lora_up.parameters(), *lora.lora_down.parameters()):
                param.mul_(ratio.sqrt().to(param.dtype))
            norms.append(norm * ratio)
            scaled.append(ratio != 1)
        return torch.stack(
            [torch.stack(scaled).sum().float(), torch.stack(norms).mean(), torch.stack(norms).max()]
        )


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """kohya entry point. `kwargs` are `--network_args` (strings) plus trainer-injected `dropout`."""
    return build_network(
        LoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs
    )


def build_network(
    cls: type[LoRANetwork],
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None,
    kwargs: dict[str, Any],
) -> Any:
    """`cls` (LoRANetwork or a subclass) from kohya's create_network arguments and kohya's defaults."""
    options = lora_options(kwargs)
    if neuron_dropout is not None:
        options = LoRAOptions(**{**options.__dict__, "dropout": neuron_dropout})
    return cls(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=network_dim if network_dim is not None else 4,  # kohya defaults
        alpha=network_alpha if network_alpha is not None else 1.0,
        options=options,
    )


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike[str] | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """kohya entry point: a network shaped like the file (per-module rank and alpha; LoCon where 4-D).

    `for_inference` is accepted for signature compatibility; the same module serves training and inference.
    """
    where = f"{WEIGHTS_FLAG} {file}" if file is not None else f"{WEIGHTS_FLAG} (state dict)"
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs `file` or `weights_sd`")
        weights_sd = load_lora_file(file, flag=WEIGHTS_FLAG)[0]
    table = select_table(unet, _as_list(text_encoder))
    candidates = find_targets(table, unet, _as_list(text_encoder), include_conv_classes=True)
    state = to_kohya_keys(weights_sd, alias_map(candidates))
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    down_dims: dict[str, int] = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        if suffix == "alpha":
            modules_alpha[name] = float(value)
        elif suffix == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
            down_dims[name] = value.dim()
    if not modules_dim:
        raise UserError(f"{where}: no `<name>.lora_down.weight` keys; not a kohya-format LoRA file")
    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        options=lora_options(kwargs),
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
    )
    created = {lo.lora_name: lo for lo in network.all_loras}
    unknown = sorted(set(modules_dim) - set(created))
    if unknown:
        raise UserError(
            f"{where}: {len(unknown)} LoRA modules match nothing in this model ({network.table.name} table): "
            f"{_preview(unknown)}; was the file trained for another model family?"
        )
    kind_bad = sorted(
        n for n, lo in created.items() if (down_dims[n] == 4) != isinstance(lo.lora_down, nn.Conv2d)
    )
    if kind_bad:
        raise UserError(f"{where}: conv/linear layout differs from the model for {_preview(kind_bad)}")
    return network, state

"""What a LoRA file holds, for tools/check_lora.py: layout, family, maker, modules, and keys no loader matches.

Module names are checked against the family's key table (`family_tables.family_targets`, the trainer's own
table on the real or tiny model), accepting every spelling `--network_weights` reads (`networks.key_aliases`).
Shapes are checked against the matched model module.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from networks.key_aliases import PartAlias
from networks.ops.family_tables import best_targets, detect_family, family_aliases, in_features
from networks.targets import Target

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "FLUX.1"}
_SUFFIXES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
}
# suffixes of other network types: named so the report says what they are
_FOREIGN = {
    "dora_scale": "DoRA magnitude",
    "hada_w1_a": "LyCORIS LoHa",
    "lokr_w1": "LyCORIS LoKr",
    "diff": "full weight difference",
}


@dataclass
class ModuleInfo:
    name: str
    kind: str  # linear / conv1x1 / conv3x3
    rank: int
    alpha: float | None
    down_norm: float
    up_norm: float
    delta_norm: float  # ‖up @ down‖ × alpha / rank (Frobenius)


@dataclass
class LoRAReport:
    layout: str
    family: str | None
    table_size: str | None  # which model the names were checked against: "real" or "tiny"
    makers: list[str]
    modules: list[ModuleInfo]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _layout(keys: list[str]) -> str:
    kohya = any(k.startswith("lora_") and k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)
    peft = any(k.endswith((".lora_A.weight", ".lora_A.default.weight")) for k in keys)
    if kohya and peft:
        return "mixed kohya and diffusers/PEFT keys"
    if peft:
        flux = any(k.startswith("transformer.") for k in keys)
        return (
            "diffusers/PEFT (AI-Toolkit style: transformer.*)"
            if flux
            else "diffusers/PEFT (unet.*/text_encoder.*)"
        )
    return "kohya (lora_down/lora_up/alpha)" if kohya else "unknown (no LoRA down/up weights)"


def makers(metadata: Mapping[str, str], layout: str) -> list[str]:
    """Which tools made / touched the file, from its metadata."""
    found = []
    impl = metadata.get("modelspec.implementation_version", "")
    if impl.startswith("loratrain"):
        found.append(f"trained by loratrain ({impl})")
    elif any(k.startswith("ss_") for k in metadata):
        module = metadata.get("ss_network_module", "?")
        found.append(f"kohya-style trainer (ss_* metadata, network module {module})")
    comment = metadata.get("ss_training_comment", "")
    if "resized from" in comment or comment.startswith("Dynamic resize"):
        found.append(f"resized: {comment.split(';')[0]}")
    if comment.startswith(("svd merge", "merged")) or "modelspec.merged_from" in metadata:
        found.append(f"merged from: {metadata.get('modelspec.merged_from', comment)}")
    if "extract" in comment.lower():
        found.append(f"extracted: {comment.split(';')[0]}")
    if any("ai-toolkit" in v.lower() or "ai_toolkit" in v.lower() for v in metadata.values()):
        found.append("AI-Toolkit (metadata)")
    if not found:
        found.append(f"no trainer metadata; {layout} layout")
    return found


def _norms(down: torch.Tensor, up: torch.Tensor, scale: float) -> tuple[float, float, float]:
    d, u = down.reshape(down.shape[0], -1).double(), up.reshape(up.shape[0], -1).double()
    # ‖U D‖² = Σ (UᵀU) ⊙ (D Dᵀ): the r×r Gram matrices, never the full out×in product
    gram = float(((u.T @ u) * (d @ d.T)).sum())
    return float(d.norm()), float(u.norm()), abs(scale) * math.sqrt(max(gram, 0.0))


def _split(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _expected(target: Target | PartAlias, table: dict[str, Target]) -> tuple[int, int]:
    """(in, out) of the model module a file's module stands for."""
    if isinstance(target, PartAlias):
        whole = table[target.name]
        return in_features(whole.module), target.sizes[target.index]
    out = sum(_out_features(p) for p in target.parts) if target.parts else _out_features(target.module)
    return in_features(target.module), out


def _out_features(module: torch.nn.Module) -> int:
    return int(getattr(module, "out_features", getattr(module, "out_channels", 0)))


def _group(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        split = _split(key)
        if split is None:
            suffix = key.rsplit(".", 1)[-1]
            what = _FOREIGN.get(suffix)
            unknown.append(
                f"{key}: unknown suffix .{suffix}" + (f" ({what}; no loader here reads it)" if what else "")
            )
            continue
        modules.setdefault(split[0], {})[_SUFFIXES[split[1]]] = value
    return modules, unknown


def check_state(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> LoRAReport:
    """The whole report of one file's tensors and metadata."""
    layout = _layout(list(state))
    family, notes = detect_family(state, metadata)
    modules, problems = _group(state)
    widths = {n: int(t["down"].shape[1]) for n, t in modules.items() if "down" in t}
    size, table = best_targets(family, widths) if family else (None, {})
    aliases = family_aliases(family, size) if family and size else {}
    infos = []
    for name, tensors in modules.items():
        down, up = tensors.get("down"), tensors.get("up")
        if down is None or up is None:
            problems.append(
                f"{name}: has {'up' if down is None else 'down'} but no {'down' if down is None else 'up'}"
            )
            continue
        rank = int(down.shape[0])
        alpha = float(tensors["alpha"]) if "alpha" in tensors else None
        kind = "linear" if down.dim() == 2 else ("conv1x1" if tuple(down.shape[2:]) == (1, 1) else "conv3x3")
        infos.append(ModuleInfo(name, kind, rank, alpha, *_norms(down, up, (alpha or rank) / rank)))
        if up.shape[1] != rank:
            problems.append(f"{name}: up has {up.shape[1]} columns but down has rank {rank}")
        if not family:
            continue
        target = table.get(name) or aliases.get(name)
        if target is None:
            problems.append(
                f"{name}: no {FAMILY_NAMES[family]} module of that name; loaders ignore or reject it"
            )
            continue
        resolved = target if isinstance(target, (Target, PartAlias)) else table[target]
        want_in, want_out = _expected(resolved, table)
        if down.shape[1] != want_in or up.shape[0] != want_out:
            problems.append(
                f"{name}: down {list(down.shape)} / up {list(up.shape)} do not fit the model's "
                f"{want_in} -> {want_out} module"
            )
    if family is None:
        notes.append("family unknown: no SD/SDXL/FLUX module names and no ss_base_model_version/modelspec")
    return LoRAReport(layout, family, size, makers(metadata, layout), infos, problems, notes)


def _counts(values: list) -> str:
    return ", ".join(f"{v} x{n}" for v, n in sorted(Counter(values).items(), key=lambda kv: -kv[1]))


def format_report(report: LoRAReport, *, modules: bool = True) -> list[str]:
    family = FAMILY_NAMES.get(report.family or "", "unknown")
    lines = [
        f"layout: {report.layout}",
        f"family: {family}" + (f" (checked on the {report.table_size} model)" if report.table_size else ""),
    ]
    lines += [f"made by: {m}" for m in report.makers]
    lines += [f"note: {n}" for n in report.notes]
    infos = report.modules
    lines.append(f"modules: {len(infos)} ({_counts([i.kind for i in infos]) or 'none'})")
    if infos:
        lines.append(f"ranks: {_counts([i.rank for i in infos])}")
        lines.append(f"alphas: {_counts(['none' if i.alpha is None else f'{i.alpha:g}' for i in infos])}")
        norms = [i.delta_norm for i in infos]
        lines.append(
            f"|dW| (Frobenius): min {min(norms):.4g}, mean {sum(norms) / len(norms):.4g}, max {max(norms):.4g}"
        )
        zero = [i.name for i in infos if i.delta_norm == 0]
        if zero:
            lines.append(f"zero modules (no effect): {len(zero)}, e.g. {zero[0]}")
    if modules and infos:
        lines.append(
            f"{'module':80} {'kind':8} {'rank':>4} {'alpha':>7} {'|down|':>9} {'|up|':>9} {'|dW|':>9}"
        )
        for i in infos:
            alpha = "-" if i.alpha is None else f"{i.alpha:g}"
            lines.append(
                f"{i.name:80} {i.kind:8} {i.rank:>4} {alpha:>7} {i.down_norm:9.4g} {i.up_norm:9.4g} {i.delta_norm:9.4g}"
            )
    lines.append(f"problems: {len(report.problems)}" if report.problems else "problems: none")
    lines += [f"  {p}" for p in report.problems]
    return lines


def format_metadata(metadata: Mapping[str, str]) -> str:
    """kohya's tools/show_metadata.py output (sorted, indented JSON), with JSON-valued entries expanded."""
    expanded: dict[str, object] = {}
    for key, value in metadata.items():
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            parsed = value
        expanded[key] = parsed if isinstance(parsed, (dict, list)) else value
    return json.dumps(expanded, indent=4, sort_keys=True, ensure_ascii=False)

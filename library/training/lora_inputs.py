"""LoRA files a run starts from (--network_weights, --base_weights, a --resume state) that belong to another
model family: told from their module names in the safetensors header, before any weights load.

Shapes (another --network_dim, another model of the same family) need the built network; `load_weights` and
`load_state` report those after loading.
"""

from __future__ import annotations

from pathlib import Path

from library.config import TrainConfig
from library.errors import UserError
from library.families.base import ModelFamily

LABELS = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flux": "FLUX.1"}


def _module_names(path: Path) -> list[str]:
    """Tensor names of a readable safetensors file; [] for anything else (loading reports it later)."""
    from safetensors import safe_open

    from networks.lora_file import is_safetensors

    try:
        if not path.is_file() or not is_safetensors(path):
            return []
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
    except Exception:  # a corrupt header is reported, with the file named, where the file is loaded
        return []


def _foreign(path: Path, family: ModelFamily) -> tuple[str, str, str] | None:
    """(other family, its script, an example module name) when `path` holds another family's LoRA."""
    from library.families import get_family
    from networks.ops.family_tables import coarse_family_from_names

    names = _module_names(path)
    found = coarse_family_from_names(names)
    if found is None or found == family.name or found not in LABELS:
        return None
    example = next(n for n in names if not n.endswith(".alpha")).rsplit(".", 2)[0]
    return found, get_family(found).script, example


def check_lora_inputs(config: TrainConfig, family: ModelFamily) -> None:
    """UserError, one line per file, for LoRA inputs made for another family than `family` trains."""
    this = LABELS.get(family.name, family.name)
    problems = []
    files = [("--network_weights", config.network_weights)]
    files += [("--base_weights", path) for path in config.base_weights or []]
    for flag, value in files:
        if value and (hit := _foreign(Path(value), family)):
            other, script, example = hit
            problems.append(
                f"{flag} {value}: a LoRA for {LABELS[other]} (modules like {example}), but {family.script} trains "
                f"{this}; pass a LoRA made for this model family, or train with {script}"
            )
    if config.resume and (hit := _foreign(Path(config.resume) / "network.safetensors", family)):
        other, script, example = hit
        problems.append(
            f"--resume: {config.resume} holds the state of {LABELS[other]} training (modules like {example}), but "
            f"{family.script} trains {this}; resume it with {script}, or pass a *-state folder this script saved"
        )
    if problems:
        raise UserError(*problems)

"""kohya's sample-prompt files (.txt, .toml, .json) -> SamplePrompt list, and the sampler names.

Pure: no model, no torch. Runs in validation, so a malformed line fails before any weights load.
.txt lines: `prompt --n negative --w 512 --h 768 --s 30 --l 7.5 --d 42 --ss euler_a` (options split on
" --"; `#` lines and blank lines are skipped). .toml: a `[prompt]` table of defaults plus `[[prompt.subset]]`
entries; .json: a list of objects. Both use kohya's keys (prompt, negative_prompt, width, height,
sample_steps, scale, seed, sample_sampler).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from library.errors import UserError, did_you_mean

log = logging.getLogger("loratrain")

# kohya's names -> (diffusers scheduler class, extra config). k_* are kohya's aliases.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}

# kohya's defaults for SD 1.x/2.x sampling.
DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_SCALE = 512, 30, 7.5

# .txt option -> (dict key, converter)
_TXT_OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "s": ("sample_steps", int),
    "l": ("scale", float),
    "d": ("seed", int),
    "ss": ("sample_sampler", str),
    "g": ("guidance_scale", float),  # FLUX.1 dev's distilled guidance; other families ignore it
}
# kohya options for other families or features (FLUX guidance and flow shift, ControlNet, renorm CFG): they
# change nothing for SD, so a shared prompt file still works; each is reported once as ignored.
_TXT_IGNORED = {"fs": "flow shift", "cn": "ControlNet image", "ctr": "ControlNet"}
_TXT_IGNORED |= {"rcfg": "renormalized CFG", "am": "attention mask"}
_KEYS = {"prompt", "negative_prompt", "width", "height", "sample_steps", "scale", "seed", "sample_sampler"}
_KEYS |= {"guidance_scale"}
_KEYS_IGNORED = {"subset", "enum"}


@dataclass(frozen=True)
class SamplePrompt:
    index: int  # position in the file, kohya's `enum`; part of the image name
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None
    sampler: str | None = None  # None: --sample_sampler
    guidance: float | None = None  # FLUX.1 dev's guidance (--g); None: --guidance_scale


# Samplers whose diffusers class needs an optional package.
_SAMPLER_PACKAGES = {"LMSDiscreteScheduler": "scipy"}


def check_sampler(name: str, where: str) -> str | None:
    """A one-line problem for an unknown sampler name (listing the valid ones) or one whose optional package
    is missing, else None."""
    if name.lower() in SAMPLERS:
        import importlib.util

        package = _SAMPLER_PACKAGES.get(SAMPLERS[name.lower()][0])
        if package and importlib.util.find_spec(package) is None:
            return f"{where}: sampler {name!r} needs the {package} package; pip install {package}, or pick another"
        return None
    return (
        f"{where}: unknown sampler {name!r}{did_you_mean(name.lower(), SAMPLERS.keys())}; "
        f"use one of {', '.join(SAMPLERS)}"
    )


def _from_dict(raw: dict[str, Any], index: int, where: str, size_multiple: int) -> SamplePrompt:
    problems = []
    for key in sorted(raw.keys() - _KEYS - _KEYS_IGNORED):
        problems.append(f"{where}: unknown key {key!r}{did_you_mean(key, _KEYS)}")
    values: dict[str, Any] = {}
    for key, kind in (
        ("prompt", str),
        ("negative_prompt", str),
        ("width", int),
        ("height", int),
        ("sample_steps", int),
        ("scale", float),
        ("seed", int),
        ("sample_sampler", str),
        ("guidance_scale", float),
    ):
        if raw.get(key) is None:
            continue
        value = raw[key]
        ok = (
            isinstance(value, str)
            if kind is str
            else isinstance(value, (int, float) if kind is float else int)
        )
        if not ok or isinstance(value, bool):
            problems.append(f"{where}: {key} must be {'text' if kind is str else 'a number'}, got {value!r}")
            continue
        values[key] = value
    if not str(values.get("prompt", "")).strip():
        problems.append(f"{where}: no prompt")
    for key in ("width", "height", "sample_steps"):
        if key in values and values[key] < 1:
            problems.append(f"{where}: {key} must be positive, got {values[key]}")
    if "sample_sampler" in values and (problem := check_sampler(values["sample_sampler"], where)):
        problems.append(problem)
    if problems:
        raise UserError(*problems)

    def size(key: str) -> int:
        # kohya rounds down to the latent grid, but never below 64 pixels.
        value = values.get(key, DEFAULT_SIZE)
        return max(64, value - value % size_multiple)

    return SamplePrompt(
        index=index,
        prompt=values["prompt"].strip(),
        negative_prompt=values.get("negative_prompt", ""),
        width=size("width"),
        height=size("height"),
        steps=max(1, min(1000, values.get("sample_steps", DEFAULT_STEPS))),
        scale=float(values.get("scale", DEFAULT_SCALE)),
        seed=values.get("seed"),
        sampler=values["sample_sampler"].lower() if "sample_sampler" in values else None,
        guidance=float(values["guidance_scale"]) if "guidance_scale" in values else None,
    )


def parse_txt_line(line: str, where: str) -> dict[str, Any]:
    """One .txt line -> kohya's prompt dict; raises UserError naming `where` (file:line)."""
    parts = line.split(" --")
    raw: dict[str, Any] = {"prompt": parts[0]}
    problems = []
    for part in parts[1:]:
        name, _, value = part.strip().partition(" ")
        name, value = name.lower(), value.strip()  # kohya matches option names case-insensitively
        if name in _TXT_IGNORED:
            log.warning(
                "%s: --%s (%s) has no effect for this model; ignored", where, name, _TXT_IGNORED[name]
            )
            continue
        option = _TXT_OPTIONS.get(name)
        if option is None:
            hint = did_you_mean(name, _TXT_OPTIONS.keys()).replace('"', '"--', 1)
            problems.append(
                f"{where}: unknown option --{name}{hint}; options: --n --w --h --s --l --d --ss --g"
            )
            continue
        key, convert = option
        if not value and convert is not str:
            problems.append(f"{where}: --{name} needs a value")
            continue
        try:
            raw[key] = convert(value)
        except ValueError:
            what = "an integer" if convert is int else "a number"
            problems.append(f"{where}: --{name} must be {what}, got {value!r}")
    if problems:
        raise UserError(*problems)
    return raw


def _raw_entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, prompt dict) for each prompt in the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--sample_prompts: cannot read {path} ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import toml

        try:
            data = toml.loads(text)
        except Exception as exc:  # toml raises several types; all mean "fix the syntax"
            raise UserError(f"{path}: not valid TOML: {str(exc).splitlines()[0]}") from None
        table = data.get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise UserError(
                f"{path}: expected a [prompt] table with [[prompt.subset]] entries (kohya's format)"
            )
        defaults = {k: v for k, v in table.items() if k != "subset"}
        return [(f"{path}: prompt.subset {i + 1}", {**defaults, **s}) for i, s in enumerate(table["subset"])]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise UserError(
                f"{path}: expected a list of objects with prompt, width, height, ... (kohya's format)"
            )
        return [(f"{path}: entry {i + 1}", d) for i, d in enumerate(data)]
    entries, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            entries.append((where, parse_txt_line(line, where)))
        except UserError as exc:
            problems += exc.problems
    if problems:
        raise UserError(*problems)
    return entries


def load_sample_prompts(path: Path, size_multiple: int = 8) -> list[SamplePrompt]:
    """Every prompt of a kohya sample-prompt file; all problems at once as a UserError."""
    if not path.is_file():
        raise UserError(f"--sample_prompts: file {path} does not exist")
    prompts, problems = [], []
    for where, raw in _raw_entries(path):
        try:
            prompts.append(_from_dict(raw, len(prompts), where, size_multiple))
        except UserError as exc:
            problems += exc.problems
    if problems:
        raise UserError(*problems)
    if not prompts:
        raise UserError(f"--sample_prompts: {path} holds no prompts")
    return prompts


def with_default_sampler(prompts: list[SamplePrompt], sampler: str) -> list[SamplePrompt]:
    return [p if p.sampler else replace(p, sampler=sampler.lower()) for p in prompts]

"""The kohya dataset-config schema: which keys exist, at which levels, with which types.

Reading and checking are separate from value resolution (dataset_config.py) so that a later issue can add
the remaining kohya keys here as rows. Keys kohya knows but we do not implement yet are never silently
ignored: they are accepted only with a value that changes nothing (e.g. `color_aug = false`, common in
configs that spell out defaults), otherwise they are reported as "not supported yet".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from library.data.augment import INTERPOLATIONS
from library.errors import UserError, did_you_mean

_ALL = ("general", "dataset", "subset")
_UPPER = ("general", "dataset")
_SUBSET = ("subset",)

# key -> (type, levels). Types: int, bool, str, float (any number), resolution (int or [w, h]).
KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resolution": ("resolution", _UPPER),
    "batch_size": ("int", _UPPER),
    "enable_bucket": ("bool", _UPPER),
    "min_bucket_reso": ("int", _UPPER),
    "max_bucket_reso": ("int", _UPPER),
    "bucket_reso_steps": ("int", _UPPER),
    "bucket_no_upscale": ("bool", _UPPER),
    "num_repeats": ("int", _ALL),
    "caption_extension": ("str", _ALL),
    "class_tokens": ("str", _ALL),
    "shuffle_caption": ("bool", _ALL),
    "caption_separator": ("str", _ALL),
    "keep_tokens": ("int", _ALL),
    "caption_prefix": ("str", _ALL),
    "caption_suffix": ("str", _ALL),
    "keep_tokens_separator": ("str", _ALL),
    "secondary_separator": ("str", _ALL),
    "enable_wildcard": ("bool", _ALL),
    "caption_dropout_rate": ("float", _ALL),
    "caption_dropout_every_n_epochs": ("int", _ALL),
    "caption_tag_dropout_rate": ("float", _ALL),
    "token_warmup_min": ("int", _ALL),
    "token_warmup_step": ("float", _ALL),
    "flip_aug": ("bool", _ALL),
    "random_crop": ("bool", _ALL),
    "color_aug": ("bool", _ALL),
    "face_crop_aug_range": ("face_range", _ALL),
    "resize_interpolation": ("interpolation", _ALL),
    "alpha_mask": ("bool", _SUBSET),
    "conditioning_data_dir": ("str", _SUBSET),
    "image_dir": ("str", _SUBSET),
    "is_reg": ("bool", _SUBSET),
    "metadata_file": ("str", _SUBSET),
    "validation_split": ("float", _UPPER),
    "validation_seed": ("int", _UPPER),
}
ALIASES = {"caption_extention": "caption_extension"}  # kohya's legacy misspelling
_MINIMUM = {
    "batch_size": 1,
    "num_repeats": 1,
    "keep_tokens": 0,
    "bucket_reso_steps": 1,
    "min_bucket_reso": 1,
    "max_bucket_reso": 1,
    "caption_dropout_rate": 0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0,
    "token_warmup_min": 0,
    "token_warmup_step": 0,
}
_MAXIMUM = {"caption_dropout_rate": 1, "caption_tag_dropout_rate": 1}
_NON_EMPTY = {"caption_extension", "caption_separator", "image_dir", "metadata_file", "conditioning_data_dir"}
_ANY = object()
# kohya keys not implemented yet -> values that change nothing (accepted), or _ANY.
NOT_YET: dict[str, tuple[Any, ...]] = {
    "network_multiplier": (1, 1.0),
    "custom_attributes": ({},),
    "cache_info": (False,),
}
_STRUCTURE = {"top": ("general", "datasets"), "dataset": ("subsets",)}
_LEVEL_NAMES = {"general": "[general]", "dataset": "[[datasets]]", "subset": "[[datasets.subsets]]"}
_EXPECTED = {
    "int": "an integer",
    "bool": "true or false",
    "str": "a string",
    "float": "a number",
    "resolution": "a positive integer or [width, height]",
    "face_range": "[lo, hi] with 0 < lo <= hi (crop side / face size, e.g. [2.0, 4.0])",
    "interpolation": f"one of {', '.join(INTERPOLATIONS)}",
}


class ConfigProblems:
    """Collects every problem of one file so they can be reported together."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []
        self._paths: set[str] = set()

    def add(self, path: str, message: str) -> None:
        self._paths.add(path)
        self.lines.append(f"{self.source}: {path} {message}" if path else f"{self.source}: {message}")

    def has(self, path: str) -> bool:
        return path in self._paths

    def raise_if_any(self) -> None:
        if self.lines:
            raise UserError(*self.lines)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python, not in a config file
        return type(a) is type(b) and a == b
    return a == b


def _convert(kind: str, value: Any) -> Any:
    """The value in its Python form, or raise ValueError when it has the wrong type."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int" and is_int:
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "float" and (is_int or isinstance(value, float)):
        return float(value)
    if kind == "interpolation" and isinstance(value, str) and value in INTERPOLATIONS:
        return value
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    if kind == "face_range" and numbers and len(value) == 2 and 0 < value[0] <= value[1]:
        return (float(value[0]), float(value[1]))
    if kind == "resolution":
        if is_int and value > 0:
            return (value, value)
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        ):
            return (value[0], value[1])
    raise ValueError


def _check_value(key: str, value: Any, path: str, problems: ConfigProblems) -> tuple[bool, Any]:
    kind = KEYS[key][0]
    try:
        converted = _convert(kind, value)
    except ValueError:
        problems.add(path, f"must be {_EXPECTED[kind]}, got {_show(value)}")
        return False, None
    if key in _MINIMUM and converted < _MINIMUM[key]:
        problems.add(path, f"must be >= {_MINIMUM[key]}, got {converted}")
        return False, None
    if key in _MAXIMUM and converted > _MAXIMUM[key]:
        problems.add(path, f"must be <= {_MAXIMUM[key]}, got {converted}")
        return False, None
    if key == "validation_split" and not 0 <= converted < 1:
        problems.add(
            path, f"must be at least 0 and below 1 (the share of each subset held out), got {converted}"
        )
        return False, None
    if key in _NON_EMPTY and not converted:
        problems.add(path, "must not be empty")
        return False, None
    return True, converted


def _known_elsewhere(key: str, level: str, path: str, problems: ConfigProblems) -> None:
    places = " or ".join(_LEVEL_NAMES[lv] for lv in KEYS[key][1])
    where = _LEVEL_NAMES.get(level, "the top level")
    problems.add(path, f"is not allowed in {where}; put it in {places}")


def check_table(raw: Any, where: str, level: str, problems: ConfigProblems) -> dict[str, tuple[Any, str]]:
    """Validate one table's keys and value types; returns canonical key -> (value, key path).

    Structural keys (general, datasets, subsets) are returned with their raw value and checked by the caller.
    """
    if not isinstance(raw, dict):
        problems.add(where, f"must be a table, got {_show(raw)}")
        return {}
    structure = _STRUCTURE.get(level, ())
    candidates = set(KEYS) | set(NOT_YET) | set(ALIASES) | set(structure)
    table: dict[str, tuple[Any, str]] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        canonical = ALIASES.get(key, key)
        if key in structure:
            table[key] = (value, path)
        elif level == "top" and (canonical in KEYS or canonical in NOT_YET):
            problems.add(path, "must be inside [general], [[datasets]] or [[datasets.subsets]]")
        elif canonical in NOT_YET:
            accepted = NOT_YET[canonical]
            if not any(a is _ANY or _same(value, a) for a in accepted):
                noop = " or ".join(f"{canonical} = {_show(a)}" for a in accepted[:1])
                hint = f" (only {noop} is accepted for now)" if noop else ""
                problems.add(path, f"is not supported yet{hint}; remove it")
        elif canonical in KEYS:
            if level not in KEYS[canonical][1]:
                _known_elsewhere(canonical, level, path, problems)
            elif canonical in table:
                problems.add(path, f'sets {canonical} twice (with "{key}"); keep one')
            else:
                ok, converted = _check_value(canonical, value, path, problems)
                if ok:
                    table[canonical] = (converted, path)
        else:
            hint = did_you_mean(key, candidates)
            problems.add(path, f"is not a known key{hint or '; remove it or fix its spelling'}")
    return table


_TOML_HINTS = {
    "Invalid value": 'values must be "quoted strings", numbers, true/false or [lists]',
    "Expected '=' after a key": "each line must be key = value",
    "Cannot declare": "a key or table is defined twice",
    "Cannot overwrite": "a key or table is defined twice",
}


def _toml_error(path: Path, message: str, line: int | None, col: int | None) -> UserError:
    message = re.sub(r"\s*\(at line \d+, column \d+\)|\s*\(line \d+ column \d+ char \d+\)", "", message)
    hint = next((h for k, h in _TOML_HINTS.items() if k in message), "fix the syntax on that line")
    where = f"{path}:{line}" if line else str(path)
    at = f" (column {col})" if col else ""
    return UserError(f"{where}: TOML syntax error: {message}{at}; {hint}")


def _parse_toml(path: Path, text: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the toml package (kohya's parser)
        import toml

        try:
            return toml.loads(text)
        except toml.TomlDecodeError as e:
            raise _toml_error(path, e.msg, e.lineno, e.colno) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"at line (\d+), column (\d+)", str(e))
        line, col = (int(match.group(1)), int(match.group(2))) if match else (None, None)
        raise _toml_error(path, str(e), line, col) from None


def toml_syntax_error(path: Path, text: str, error: Exception) -> UserError:
    """One line with line and column for a TOML file another parser (kohya's `toml` package, for
    --config_file) rejected: tomllib's wording where it rejects the text too, else that parser's own."""
    try:
        _parse_toml(path, text)
    except UserError as exc:
        return exc
    line, col = getattr(error, "lineno", None), getattr(error, "colno", None)
    return _toml_error(path, str(getattr(error, "msg", error)).splitlines()[0], line, col)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a .toml or .json dataset config; syntax errors become one-line UserErrors."""
    if not path.is_file():
        what = "is a folder; pass the .toml file inside it" if path.is_dir() else "does not exist"
        raise UserError(f"dataset config {path} {what}")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"dataset config {path} must be a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"dataset config {path} is not UTF-8; re-save it as UTF-8") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: JSON syntax error: {e.msg} (column {e.colno})") from None
    else:
        data = _parse_toml(path, text)
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be an object with general/datasets")
    return data

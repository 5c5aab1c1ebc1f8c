"""Command line and config files -> `TrainConfig`: TOML/YAML merging, coercion, unknown keys, --output_config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

from library.config.options import GROUPS, TrainConfig, default_of
from library.errors import UserError, did_you_mean

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
# Flags that only steer parsing; never stored in an output config.
_PARSE_ONLY = {"config_file", "output_config"}


def _base_type(name: str) -> tuple[type, bool, bool]:
    """(scalar type, optional?, list?) of a field."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _convert_scalar(value: Any, kind: type) -> Any:
    """Coerce one config-file value; raises ValueError with the expected type in words."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("must be true or false")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError("must be an integer")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML reads "1e-4" as a string; accept numeric strings.
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("must be a number")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError("must be a string")


def coerce_value(name: str, value: Any) -> Any:
    kind, optional, is_list = _base_type(name)
    if value is None:
        if optional or is_list:
            return [] if is_list and not optional else None
        raise ValueError("cannot be empty")
    if is_list:
        items = value if isinstance(value, list) else str(value).split()
        return [_convert_scalar(v, kind) for v in items]
    converted = _convert_scalar(value, kind)
    choices = _FIELDS[name].metadata.get("choices")
    if choices is not None and converted not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ValueError(f"must be one of {shown}, got {converted!r}")
    return converted


def _flatten(table: dict[str, Any]) -> dict[str, Any]:
    """kohya semantics: section names are free-form and ignored; every leaf key is an option."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[key] = value
    return flat


def _syntax_error(path: Path, text: str, error: Exception) -> UserError:
    """One line naming the file, line and column."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        from library.data.config_schema import toml_syntax_error

        return toml_syntax_error(path, text, error)
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return UserError(f"{path}: YAML syntax error: {problem}; fix the syntax")
    return UserError(
        f"{path}:{mark.line + 1}: YAML syntax error: {problem} (column {mark.column + 1}); fix the syntax"
    )


def load_config_file(path: Path) -> dict[str, Any]:
    """Read and check a TOML/YAML options file; returns coerced values or raises UserError (all problems)."""
    if not path.exists() and path.suffix == "":
        path = path.with_suffix(".toml")  # kohya allows the extension to be omitted
    if not path.is_file():
        raise UserError(f"--config_file: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"--config_file: {path} is not UTF-8 (byte {exc.start}); re-save it as UTF-8"
        ) from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            import toml

            raw = toml.loads(text)
    except Exception as exc:  # toml/yaml raise several error types; all mean "fix the syntax"
        raise _syntax_error(path, text, exc) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a table of options at the top level")
    from library.kohya_pending import PENDING, pending_problem

    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in _flatten(raw).items():
        if key in PENDING:
            problem = pending_problem(key, value, str(path))
            if problem:
                problems.append(problem)
            continue
        if key not in _FIELDS or key in _PARSE_ONLY:
            hint = did_you_mean(key, _FIELDS.keys()) or "; remove it or fix its spelling (--help lists them)"
            problems.append(f"{path}: unknown option {key!r}{hint}")
            continue
        try:
            values[key] = coerce_value(key, value)
        except ValueError as exc:
            problems.append(
                f"{path}: {key} {exc}, got {value!r}" if "got" not in str(exc) else f"{path}: {key} {exc}"
            )
    if problems:
        raise UserError(*problems)
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # argparse's "argument --x: invalid integer value: 'a'" in the wording config files get
        bad_value = re.fullmatch(r"argument (--\w+): invalid (integer|number) value: (.*)", message)
        if bad_value:
            flag, kind, value = bad_value.groups()
            article = "an" if kind == "integer" else "a"
            raise UserError(f"command line: {flag} must be {article} {kind}, got {value}")
        raise UserError(f"command line: {message}")


def _cli_type(name: str) -> Any:
    kind, _, _ = _base_type(name)

    def convert(text: str) -> Any:
        if text.lower() in ("none", "null") and _base_type(name)[1]:
            return None
        return kind(text)

    convert.__name__ = {int: "integer", float: "number"}.get(kind, "string")
    return convert


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False, usage="%(prog)s [options]")
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for name, f in _FIELDS.items():
        kind, _, is_list = _base_type(name)
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _cli_type(name)
            if is_list:
                kwargs["nargs"] = f.metadata.get("nargs", "*")
            choices = f.metadata.get("choices")
            if choices:
                kwargs["choices"] = choices
                kwargs["metavar"] = "{" + ",".join(str(c) for c in choices if c is not None) + "}"
        groups[f.metadata["group"]].add_argument(f"--{name}", **kwargs)
    return parser


def _drop_pending_flags(tokens: list[str]) -> list[str]:
    """Remove kohya flags we do not implement yet when they carry kohya's default; raise for other values."""
    from library.kohya_pending import PENDING, pending_problem

    rest, problems, i = [], [], 0
    while i < len(tokens):
        token = tokens[i]
        name = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if name not in PENDING:
            rest.append(token)
            i += 1
            continue
        if "=" in token:
            value, i = token.split("=", 1)[1], i + 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value, i = tokens[i + 1], i + 2
        else:
            value, i = True, i + 1  # a bare switch
        problem = pending_problem(name, value, "command line")
        if problem:
            problems.append(problem.replace(f": {name} ", f": --{name} ", 1))
    if problems:
        raise UserError(*problems)
    return rest


def parse_config(
    argv: list[str], *, prog: str, description: str, defaults: dict[str, Any] | None = None
) -> TrainConfig:
    """CLI (+ config file) -> TrainConfig. `defaults` are a script's own defaults (e.g. SDXL bucket steps)."""
    parser = build_parser(prog, description)
    known, unknown = parser.parse_known_args(argv)
    unknown = _drop_pending_flags(unknown)
    if unknown:
        problems = []
        after_unknown_flag = False
        for token in unknown:
            if token.startswith("--"):
                name = token[2:].split("=", 1)[0]
                hint = did_you_mean(name, _FIELDS.keys()).replace('"', '"--', 1)
                problems.append(f"command line: unknown flag --{name}{hint}")
                after_unknown_flag = "=" not in token
            elif not after_unknown_flag:  # values of an unknown flag are not worth a second message
                problems.append(f"command line: unexpected argument {token!r}")
        raise UserError(*problems)
    cli = vars(known)
    values: dict[str, Any] = dict(defaults or {})
    if cli.get("config_file"):
        values.update(load_config_file(Path(cli["config_file"])))
    values.update(cli)
    return TrainConfig(**values)


def non_default_values(config: TrainConfig) -> dict[str, Any]:
    out = {}
    for name, f in _FIELDS.items():
        if name in _PARSE_ONLY:
            continue
        value = getattr(config, name)
        if value != default_of(f):
            out[name] = value
    return out


def write_output_config(config: TrainConfig, path: Path) -> None:
    """kohya's --output_config: the resolved non-default options as TOML; never overwrites."""
    import toml

    if path.exists():
        raise UserError(f"--output_config: {path} already exists; choose another path or delete it")
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in non_default_values(config).items():
        if value is None:
            continue
        grouped.setdefault(_FIELDS[name].metadata["group"], {})[name] = value
    from networks.lora_file import atomic_write

    text = toml.dumps(grouped).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


# Never sent to a tracker by --log_config (kohya's filter): secrets, and paths that reveal the user's files.
_NOT_LOGGED = {"wandb_api_key", "huggingface_token", "config_file", "output_config"}


def loggable_options(config: TrainConfig) -> dict[str, Any]:
    """The options for --log_config: no secrets, no paths (names ending in _dir/_path/_file/_json, model,
    VAE, dataset, resume, weight and prompt files)."""
    paths = {
        "vae",
        "dataset_config",
        "in_json",
        "resume",
        "network_weights",
        "sample_prompts",
        "tokenizer_path",
        "tokenizer_2_path",
        "clip_l",
        "t5xxl",
        "ae",
    }
    return {
        name: getattr(config, name)
        for name in _FIELDS
        if name not in _NOT_LOGGED
        and name not in paths
        and not name.endswith(("_dir", "_path", "_file", "_name_or_path"))
    }


def config_as_json(config: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


def print_help_and_exit(prog: str, description: str) -> None:
    build_parser(prog, description).print_help()
    sys.exit(0)

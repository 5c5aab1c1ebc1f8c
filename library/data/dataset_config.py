"""Dataset blueprints: kohya's dataset TOML/JSON schema and DreamBooth folders, validated up front.

A blueprint is a list of `DatasetSpec` with every value resolved (subset -> dataset -> general -> CLI value
-> default, as kohya does) and every path checked, so that dataset building never meets a config problem.
All problems in a file are reported together in one `UserError`, each naming the file and the key path.

Relative `image_dir` and `metadata_file` paths resolve against the config file's folder when they exist
there, else against the working directory (kohya only uses the working directory; configs shipped next to
their data should work from anywhere). A fine-tune subset's `image_dir` defaults to its metadata file's
folder.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from library.data.bucketing import snap_bucket_range
from library.data.config_schema import ConfigProblems, check_table, read_config_file
from library.data.images import list_image_files
from library.data.specs import DatasetDefaults, DatasetSpec, SubsetSpec
from library.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetDefaults",
    "DatasetSpec",
    "SubsetSpec",
    "blueprint_from_dirs",
    "load_dataset_blueprint",
    "parse_dreambooth_folder_name",
]


# CLI flag (DatasetDefaults field) behind each config key, used for defaults and in messages.
_FLAG_FOR_KEY = {
    "resolution": "resolution",
    "batch_size": "train_batch_size",
    "enable_bucket": "enable_bucket",
    "min_bucket_reso": "min_bucket_reso",
    "max_bucket_reso": "max_bucket_reso",
    "bucket_reso_steps": "bucket_reso_steps",
    "bucket_no_upscale": "bucket_no_upscale",
    "num_repeats": "dataset_repeats",
    "caption_extension": "caption_extension",
    "shuffle_caption": "shuffle_caption",
    "caption_separator": "caption_separator",
    "keep_tokens": "keep_tokens",
    "flip_aug": "flip_aug",
    "random_crop": "random_crop",
    "color_aug": "color_aug",
    "face_crop_aug_range": "face_crop_aug_range",
    "resize_interpolation": "resize_interpolation",
    "alpha_mask": "alpha_mask",
    "validation_split": "validation_split",
    "validation_seed": "validation_seed",
    **{
        key: key
        for key in (
            "caption_prefix",
            "caption_suffix",
            "keep_tokens_separator",
            "secondary_separator",
            "enable_wildcard",
            "caption_dropout_rate",
            "caption_dropout_every_n_epochs",
            "caption_tag_dropout_rate",
            "token_warmup_min",
            "token_warmup_step",
        )
    },
}
_MIN_FLAG_VALUES = {
    "train_batch_size": 1,
    "dataset_repeats": 1,
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
_MAX_FLAG_VALUES = {"caption_dropout_rate": 1, "caption_tag_dropout_rate": 1}

Table = dict[str, tuple[Any, str]]  # key -> (value, where it was set)


def _default_problems(defaults: DatasetDefaults) -> list[str]:
    problems = []
    for flag, minimum in _MIN_FLAG_VALUES.items():
        value = getattr(defaults, flag)
        if value < minimum:
            problems.append(f"--{flag} must be >= {minimum}, got {value}")
    for flag, maximum in _MAX_FLAG_VALUES.items():
        value = getattr(defaults, flag)
        if value > maximum:
            problems.append(f"--{flag} must be <= {maximum}, got {value}")
    if defaults.resolution is not None and min(defaults.resolution) < 1:
        problems.append(f"--resolution must be positive, got {defaults.resolution}")
    if not defaults.caption_separator:
        problems.append("--caption_separator must not be empty")
    return problems


def _pick(key: str, tables: list[Table], defaults: DatasetDefaults) -> tuple[Any, str]:
    """Value and origin of a key: the first table that sets it, else the CLI value/default."""
    for table in tables:
        if key in table:
            return table[key]
    flag = _FLAG_FOR_KEY.get(key)
    if flag is None:  # keys without a CLI flag (class_tokens, ...) default to None
        return None, "default"
    return getattr(defaults, flag), f"--{flag}"


def _normalise_extension(ext: str) -> str:
    # kohya appends the extension verbatim, so "txt" would look for "imagetxt"; nobody means that.
    return ext if not ext or ext.startswith(".") else "." + ext


def _bucket_problems(
    where: str, resolution: tuple[int, int], values: dict[str, tuple[Any, str]]
) -> tuple[list[str], int, int]:
    """Check min/max bucket reso bracket the resolution (after snapping); returns problems and snapped values."""
    (min_reso, min_from), (max_reso, max_from) = values["min_bucket_reso"], values["max_bucket_reso"]
    steps = values["bucket_reso_steps"][0]
    snapped_min, snapped_max = snap_bucket_range(min_reso, max_reso, steps)
    if (snapped_min, snapped_max) != (min_reso, max_reso):
        logger.warning(
            "%s: min/max_bucket_reso %d/%d adjusted to multiples of bucket_reso_steps %d: %d/%d",
            where, min_reso, max_reso, steps, snapped_min, snapped_max,
        )  # fmt: skip
    problems = []
    enabled, no_upscale = values["enable_bucket"][0], values["bucket_no_upscale"][0]
    # With bucket_no_upscale the range is not used, so it cannot be wrong (kohya still asserts).
    if enabled and not no_upscale:
        res = f"{resolution[0]}x{resolution[1]}"
        if snapped_min > min(resolution):
            problems.append(
                f"{where}min_bucket_reso {snapped_min} (from {min_from}) is larger than the smaller side of "
                f"resolution {res}; set min_bucket_reso <= {min(resolution)}"
            )
        if snapped_max < max(resolution):
            problems.append(
                f"{where}max_bucket_reso {snapped_max} (from {max_from}) is smaller than the larger side of "
                f"resolution {res}; set max_bucket_reso >= {max(resolution)}"
            )
    return problems, snapped_min, snapped_max


def _make_dataset(
    where: str, tables: list[Table], defaults: DatasetDefaults, subsets: list[SubsetSpec], problems: list[str]
) -> DatasetSpec | None:
    values = {key: _pick(key, tables, defaults) for key in _FLAG_FOR_KEY}
    resolution, _ = values["resolution"]
    if resolution is None:
        problems.append(
            f"{where}resolution is not set; add e.g. resolution = 512 to [general] or pass --resolution 512"
        )
        return None
    bucket_problems, min_reso, max_reso = _bucket_problems(where, resolution, values)
    problems.extend(bucket_problems)
    return DatasetSpec(
        resolution=tuple(resolution),
        batch_size=values["batch_size"][0],
        enable_bucket=values["enable_bucket"][0],
        min_bucket_reso=min_reso,
        max_bucket_reso=max_reso,
        bucket_reso_steps=values["bucket_reso_steps"][0],
        bucket_no_upscale=values["bucket_no_upscale"][0],
        subsets=tuple(subsets),
        validation_split=values["validation_split"][0],
        validation_seed=values["validation_seed"][0],
    )


def _make_subset(image_dir: Path, is_reg: bool, tables: list[Table], defaults: DatasetDefaults) -> SubsetSpec:
    def value(key: str) -> Any:
        return _pick(key, tables, defaults)[0]

    return SubsetSpec(
        image_dir=image_dir,
        num_repeats=value("num_repeats"),
        is_reg=is_reg,
        class_tokens=value("class_tokens"),
        caption_extension=_normalise_extension(value("caption_extension")),
        shuffle_caption=value("shuffle_caption"),
        caption_separator=value("caption_separator"),
        keep_tokens=value("keep_tokens"),
        caption_prefix=value("caption_prefix"),
        caption_suffix=value("caption_suffix"),
        flip_aug=value("flip_aug"),
        random_crop=value("random_crop"),
        color_aug=value("color_aug"),
        face_crop_aug_range=value("face_crop_aug_range"),
        resize_interpolation=value("resize_interpolation"),
        alpha_mask=value("alpha_mask"),
        keep_tokens_separator=value("keep_tokens_separator"),
        secondary_separator=value("secondary_separator"),
        enable_wildcard=value("enable_wildcard"),
        caption_dropout_rate=value("caption_dropout_rate"),
        caption_dropout_every_n_epochs=value("caption_dropout_every_n_epochs"),
        caption_tag_dropout_rate=value("caption_tag_dropout_rate"),
        token_warmup_min=value("token_warmup_min"),
        token_warmup_step=value("token_warmup_step"),
    )


def _resolve_image_dir(raw: str, where: str, config_dir: Path, problems: ConfigProblems) -> Path | None:
    given = Path(raw).expanduser()
    if given.is_absolute():
        candidates = [given]
    else:
        candidates = [config_dir / given, Path.cwd() / given]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = " and ".join(str(c) for c in dict.fromkeys(candidates))
    problems.add(where, f'folder "{raw}" does not exist (looked in {looked}); fix the path')
    return None


def _metadata_subset(
    table: Table,
    where: str,
    config_dir: Path,
    tables: list[Table],
    defaults: DatasetDefaults,
    problems: ConfigProblems,
) -> SubsetSpec | None:
    """A fine-tune subset: metadata_file, and image_dir (default: the metadata file's folder)."""
    for key in ("is_reg", "class_tokens", "caption_extension"):
        if key in table:
            problems.add(
                table[key][1], "applies to DreamBooth subsets only (not with metadata_file); remove it"
            )
    if "metadata_file" not in table:  # its value was wrong; already reported
        return None
    raw = table["metadata_file"][0]
    given = Path(raw).expanduser()
    candidates = [given] if given.is_absolute() else [config_dir / given, Path.cwd() / given]
    metadata = next((c.resolve() for c in candidates if c.is_file()), None)
    if metadata is None:
        looked = " and ".join(str(c) for c in dict.fromkeys(candidates))
        problems.add(
            f"{where}.metadata_file", f'file "{raw}" does not exist (looked in {looked}); fix the path'
        )
    image_dir = metadata.parent if metadata is not None else None
    if "image_dir" in table:
        image_dir = _resolve_image_dir(table["image_dir"][0], f"{where}.image_dir", config_dir, problems)
    if metadata is None or image_dir is None:
        return None
    return replace(_make_subset(image_dir, False, tables, defaults), metadata_file=metadata)


def _mask_settings(
    subset: SubsetSpec,
    table: Table,
    where: str,
    config_dir: Path,
    defaults: DatasetDefaults,
    problems: ConfigProblems,
) -> SubsetSpec:
    """Resolve conditioning_data_dir (mask images); with --masked_loss every subset needs a mask source."""
    if "conditioning_data_dir" in table:
        raw, key_path = table["conditioning_data_dir"]
        if not defaults.masked_loss:
            problems.add(
                key_path, "holds mask images, which only --masked_loss uses; pass --masked_loss or remove it"
            )
        elif subset.metadata_file is not None:
            problems.add(
                key_path, "applies to image_dir subsets only (not with metadata_file); use alpha_mask = true"
            )
        else:
            mask_dir = _resolve_image_dir(raw, key_path, config_dir, problems)
            return subset if mask_dir is None else replace(subset, conditioning_data_dir=mask_dir)
    elif defaults.masked_loss and not subset.alpha_mask:
        problems.add(
            where,
            'has no mask for --masked_loss; set conditioning_data_dir = "<folder of masks named like the images>" '
            "or alpha_mask = true (the images' alpha channel)",
        )
    return subset


def _as_table_list(raw: Any, where: str, what: str, problems: ConfigProblems) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        problems.add(where, f"must be a list of tables ([[{what}]]), got {type(raw).__name__}")
        return []
    return raw


def load_dataset_blueprint(path: Path, defaults: DatasetDefaults) -> list[DatasetSpec]:
    """Read a kohya dataset config (.toml or .json) into validated dataset specs. Raises UserError."""
    path = Path(path)
    data = read_config_file(path)
    problems = ConfigProblems(str(path))
    for flag_problem in _default_problems(defaults):
        problems.add("", flag_problem)
    top = check_table(data, "", "top", problems)
    general = check_table(data.get("general", {}), "general", "general", problems)
    datasets_raw = _as_table_list(data.get("datasets"), "datasets", "datasets", problems)
    if not datasets_raw and "datasets" not in top:
        problems.add(
            "", 'no [[datasets]] found; add [[datasets]] and [[datasets.subsets]] with image_dir = "..."'
        )
    config_dir = path.resolve().parent
    specs = []
    for i, ds_raw in enumerate(datasets_raw):
        ds_where = f"datasets[{i}]"
        ds_table = check_table(ds_raw, ds_where, "dataset", problems)
        subsets_raw = _as_table_list(
            ds_raw.get("subsets"), f"{ds_where}.subsets", "datasets.subsets", problems
        )
        if not subsets_raw and "subsets" in ds_raw and not problems.has(f"{ds_where}.subsets"):
            problems.add(f"{ds_where}.subsets", "is empty; add [[datasets.subsets]] with image_dir")
        elif "subsets" not in ds_raw:
            problems.add(ds_where, 'has no [[datasets.subsets]]; add one with image_dir = "..."')
        subsets: list[SubsetSpec] = []
        seen: set[tuple[Path, bool]] = set()
        kinds: set[str] = set()
        for j, ss_raw in enumerate(subsets_raw):
            ss_where = f"{ds_where}.subsets[{j}]"
            ss_table = check_table(ss_raw, ss_where, "subset", problems)
            if "metadata_file" in ss_raw:
                kinds.add("fine-tune (metadata_file)")
                tables = [ss_table, ds_table, general]
                ft_subset = _metadata_subset(ss_table, ss_where, config_dir, tables, defaults, problems)
                if ft_subset is not None and (ft_subset.metadata_file, False) in seen:
                    logger.warning(
                        "%s: %s is listed twice in %s; using it once", path, ft_subset.metadata_file, ds_where
                    )
                elif ft_subset is not None:
                    seen.add((ft_subset.metadata_file, False))
                    subsets.append(
                        _mask_settings(ft_subset, ss_table, ss_where, config_dir, defaults, problems)
                    )
                continue
            kinds.add("DreamBooth (image_dir only)")
            if "image_dir" not in ss_raw:
                problems.add(ss_where, 'has no image_dir; add image_dir = "path/to/images"')
            if "image_dir" not in ss_table:
                continue
            image_dir = _resolve_image_dir(
                ss_table["image_dir"][0], f"{ss_where}.image_dir", config_dir, problems
            )
            if image_dir is None:
                continue
            is_reg = ss_table.get("is_reg", (False, ""))[0]
            if (image_dir, is_reg) in seen:
                logger.warning("%s: %s is listed twice in %s; using it once", path, image_dir, ds_where)
                continue
            seen.add((image_dir, is_reg))
            subset = _make_subset(image_dir, is_reg, [ss_table, ds_table, general], defaults)
            subsets.append(_mask_settings(subset, ss_table, ss_where, config_dir, defaults, problems))
        if len(kinds) > 1:
            problems.add(
                ds_where,
                f"mixes {' and '.join(sorted(kinds))} subsets, which kohya does not allow in one dataset; "
                "put them in separate [[datasets]]",
            )
        flat: list[str] = []
        spec = _make_dataset(f"{ds_where}: ", [ds_table, general], defaults, subsets, flat)
        for line in flat:
            problems.add("", line)
        if spec is not None:
            specs.append(spec)
    problems.raise_if_any()
    return specs


def parse_dreambooth_folder_name(name: str) -> tuple[int, str | None] | None:
    """`10_sks dog` -> (10, "sks dog"); `10` -> (10, None); None when the name has no repeat count."""
    head, _, tail = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    if repeats < 1:
        return None
    return repeats, tail or None


def _dreambooth_subsets(
    root: Path, flag: str, is_reg: bool, defaults: DatasetDefaults, problems: list[str]
) -> list[SubsetSpec]:
    """Subsets from `<repeats>_<class tokens>` folders.

    Badly named folders are an error when no folder is usable (the usual mistake: pointing at the image
    folder itself); when some are usable the others are skipped with a warning, as kohya does.
    """
    if not root.is_dir():
        problems.append(f"--{flag} {root} does not exist or is not a folder")
        return []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    subsets, bad = [], []
    for folder in folders:
        parsed = parse_dreambooth_folder_name(folder.name)
        if parsed is None:
            bad.append(folder)
            continue
        repeats, class_tokens = parsed
        tables: list[Table] = [{"num_repeats": (repeats, str(folder))}]
        if class_tokens is not None:
            tables[0]["class_tokens"] = (class_tokens, str(folder))
        subsets.append(_make_subset(folder.resolve(), is_reg, tables, defaults))
    fix = "folder names must be <repeats>_<class tokens>"
    if not subsets:
        if bad:
            problems.extend(
                f"--{flag}: {b} is not named <repeats>_<class tokens>; rename it to e.g. 10_{b.name}"
                for b in bad
            )
        elif list_image_files(root):
            problems.append(
                f"--{flag} {root} holds images directly; {fix}: move them into a sub-folder such as "
                f"{root / ('10_' + root.name)} (10 = repeats)"
            )
        else:
            problems.append(f"--{flag} {root} has no sub-folders; {fix}, e.g. {root / '10_sks dog'}")
    for b in bad if subsets else []:
        logger.warning("--%s: skipping %s; %s (rename it to e.g. 10_%s)", flag, b, fix, b.name)
    return subsets


def blueprint_from_dirs(
    train_data_dir: Path, reg_data_dir: Path | None, defaults: DatasetDefaults
) -> list[DatasetSpec]:
    """One dataset from kohya DreamBooth folders (`--train_data_dir`, optional `--reg_data_dir`)."""
    problems = _default_problems(defaults)
    if defaults.masked_loss and not defaults.alpha_mask:
        problems.append(
            "--masked_loss needs masks: with --train_data_dir pass --alpha_mask (the images' alpha channel), or "
            "use a --dataset_config with conditioning_data_dir (mask images) per subset"
        )
    if defaults.resolution is None:
        problems.append("--resolution is required with --train_data_dir; e.g. --resolution 512 (or 512,768)")
    subsets = _dreambooth_subsets(Path(train_data_dir), "train_data_dir", False, defaults, problems)
    if reg_data_dir is not None:
        subsets += _dreambooth_subsets(Path(reg_data_dir), "reg_data_dir", True, defaults, problems)
    spec = None
    if defaults.resolution is not None and not problems:
        spec = _make_dataset("", [], defaults, subsets, problems)
    if problems:
        raise UserError(*problems)
    assert spec is not None
    return [spec]

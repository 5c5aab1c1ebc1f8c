"""Fine-tune datasets (kohya's FineTuningDataset): images listed in a metadata file, not found in a folder.

`--in_json` (+ `--train_data_dir` for relative image keys) is one dataset with one such subset; a dataset
config uses `metadata_file` (+ optional `image_dir`) per subset. Captions, tags and, when the file gives
them, image sizes come from the metadata (see metadata_file.py); the image header is read only for sizes
the file lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from library.data.bucketing import BucketAssignment, BucketSelector, ImageTooSmallError
from library.data.dataset_config import (
    DatasetDefaults,
    DatasetSpec,
    SubsetSpec,
    _default_problems,
    _make_dataset,
    _make_subset,
)
from library.data.metadata_file import read_metadata_file
from library.data.samples import ScanChecks
from library.errors import UserError


@dataclass(frozen=True)
class ScannedImage:
    """One usable image of a metadata subset."""

    path: Path
    caption: str  # caption and tags joined as kohya joins them
    tags: str | None  # the tags alone: kohya's ss_tag_frequency of a fine-tune subset counts only these
    size: tuple[int, int]
    assignment: BucketAssignment


def scan_metadata_subset(
    subset: SubsetSpec,
    selector: BucketSelector,
    skipped: list[tuple[Path, str]],
    problems: list[str],
    *,
    checks: ScanChecks,
) -> list[ScannedImage]:
    """The subset's images in metadata order; problems and skipped images are appended to the lists.

    Images whose size the metadata lacks are probed through `checks` (unreadable ones are skipped, or
    problems with --strict_dataset; the caller reports them)."""
    assert subset.metadata_file is not None
    try:
        entries = read_metadata_file(
            subset.metadata_file,
            subset.image_dir,
            separator=subset.caption_separator,
            per_line_tags=subset.enable_wildcard,
        )
    except UserError as e:
        problems.extend(e.problems)
        return []
    images = []
    for entry in entries:
        size = entry.size
        if size is None:
            checked = checks.check(entry.path)
            if checked is None:
                continue
            size = checked[0]
        try:
            assignment = selector.select(*size)
        except ImageTooSmallError as e:
            skipped.append((entry.path, str(e)))
            continue
        images.append(ScannedImage(entry.path, entry.caption, entry.tags, size, assignment))
    return images


def blueprint_from_metadata(
    in_json: Path, image_dir: Path | None, defaults: DatasetDefaults
) -> list[DatasetSpec]:
    """One fine-tune dataset from kohya's `--in_json` (+ `--train_data_dir` for relative image keys).

    Relative keys resolve against `image_dir`, else the metadata file's folder (kohya requires image_dir).
    """
    problems = _default_problems(defaults)
    if defaults.resolution is None:
        problems.append("--resolution is required with --in_json; e.g. --resolution 512 (or 512,768)")
    if not Path(in_json).is_file():
        problems.append(f"--in_json {in_json} does not exist or is not a file")
    if image_dir is not None and not Path(image_dir).is_dir():
        problems.append(f"--train_data_dir {image_dir} does not exist or is not a folder")
    if problems:
        raise UserError(*problems)
    metadata = Path(in_json).resolve()
    folder = Path(image_dir).resolve() if image_dir is not None else metadata.parent
    subset = replace(_make_subset(folder, False, [], defaults), metadata_file=metadata)
    spec = _make_dataset("", [], defaults, [subset], problems)
    if problems or spec is None:
        raise UserError(*problems)
    return [spec]

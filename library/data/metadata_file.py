"""kohya fine-tune metadata: captions, tags and image sizes from one JSON or JSONL file.

Two layouts, as kohya reads them:

* JSON: `{"<image key>": {"caption": "...", "tags": "...", "image_size": [w, h]}, ...}`;
* JSONL (file name ends in `.jsonl`): one object per line,
  `{"image_path": "...", "caption": "...", "tags": "...", "image_size": [w, h]}` (or `width` + `height`).

An image key is a path, absolute or relative to the subset's image folder, with or without its extension
(kohya then tries every image extension). Tags are appended to the caption with the caption separator and
no space (`caption + "," + tags`, or the tags alone when there is no caption), exactly as kohya joins them.
With `image_size` the image header is never read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.data.images import IMAGE_EXTENSIONS
from library.errors import UserError

_MAX_LISTED = 5
_JSON_SHAPE = '{"image.png": {"caption": "...", "tags": "..."}}'


@dataclass(frozen=True)
class MetadataEntry:
    """One image of a metadata file, its path resolved; `size` is None when the file does not give it."""

    path: Path
    caption: str  # caption and tags joined
    tags: str | None
    size: tuple[int, int] | None


def join_caption(caption: str, tags: str | None, separator: str, *, per_line: bool = False) -> str:
    """kohya's join: `caption + separator + tags` (no space); with `per_line` (wildcards) on every line."""
    if not tags:
        return caption
    if per_line:
        tags = tags.replace("\n", separator)
        return "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
    return caption + separator + tags if caption else tags


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"metadata file {path} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read metadata file {path}: {e.strerror or e}") from None


def _syntax_error(where: str, e: json.JSONDecodeError, fix: str) -> str:
    return f"{where}:{e.lineno}:{e.colno}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}); {fix}"


def _size(value: Any) -> tuple[int, int] | None:
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return value[0], value[1]
    raise ValueError


def _fields(record: dict[str, Any], where: str, problems: list[str]) -> tuple[str, str | None, Any] | None:
    """(caption, tags, size) of one record, or None after adding its problems."""
    ok = True
    caption, tags = record.get("caption"), record.get("tags")
    for name, value in (("caption", caption), ("tags", tags)):
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}.{name} must be a string, got {json.dumps(value)}")
            ok = False
    size = record.get("image_size")
    if size is None and "width" in record and "height" in record:
        size = [record["width"], record["height"]]
    if size is not None:
        try:
            size = _size(size)
        except ValueError:
            problems.append(f"{where}.image_size must be [width, height] in pixels, got {json.dumps(size)}")
            ok = False
    return (caption or "", tags, size) if ok else None


def _records_json(path: Path, text: str) -> tuple[list[tuple[str, str, dict]], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(_syntax_error(str(path), e, f"kohya's format is {_JSON_SHAPE}")) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be an object {_JSON_SHAPE}, got {type(data).__name__}")
    records, problems = [], []
    for key, value in data.items():
        where = f"{path}: {json.dumps(key)}"
        if not isinstance(value, dict):
            problems.append(f'{where} must be an object like {{"caption": "..."}}, got {json.dumps(value)}')
            continue
        records.append((key, where, value))
    return records, problems


def _records_jsonl(path: Path, text: str) -> tuple[list[tuple[str, str, dict]], list[str]]:
    records, problems = [], []
    fix = 'each line must be one object like {"image_path": "...", "caption": "..."}'
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            e.lineno = number  # the decoder only saw this line
            problems.append(_syntax_error(str(path), e, fix))
            continue
        key = value.get("image_path") if isinstance(value, dict) else None
        if not isinstance(key, str) or not key:
            problems.append(f"{where}: {fix}; image_path is missing or not a string")
            continue
        records.append((key, where, value))
    return records, problems


class _Folders:
    """Directory listings, read once per folder: 10,000 keys cost a few listdir calls instead of stats."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}

    def names(self, folder: Path) -> set[str]:
        if folder not in self._names:
            try:
                self._names[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:
                self._names[folder] = set()
        return self._names[folder]

    def find(self, path: Path) -> Path | None:
        names = self.names(path.parent)
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.name in names:
            return path
        # kohya: a key without (or with a wrong) extension is tried with every image extension.
        for ext in IMAGE_EXTENSIONS:
            for candidate in (path.name + ext, path.name + ext.upper()):
                if candidate in names:
                    return path.with_name(candidate)
        return None


def read_metadata_file(
    path: Path, image_dir: Path, *, separator: str = ",", per_line_tags: bool = False
) -> list[MetadataEntry]:
    """Every image of a kohya metadata file, in file order. Raises UserError listing every problem
    (syntax errors with line and column, wrong field types, images that do not exist)."""
    text = _read_text(path)
    reader = _records_jsonl if path.suffix.lower() == ".jsonl" else _records_json
    records, problems = reader(path, text)
    entries: dict[Path, MetadataEntry] = {}
    missing: list[str] = []
    folders = _Folders()
    for key, where, record in records:
        fields = _fields(record, where, problems)
        given = Path(key).expanduser()
        image = folders.find(given if given.is_absolute() else image_dir / given)
        if image is None:
            missing.append(key)
            continue
        if fields is not None:
            caption, tags, size = fields
            caption = join_caption(caption, tags, separator, per_line=per_line_tags)
            entries[image] = MetadataEntry(image, caption, tags, size)  # a repeated key: the last one wins
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED]) + (
            f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        )
        problems.append(
            f"{path}: {len(missing)} listed image(s) not found (relative keys are looked up in {image_dir}): "
            f"{shown}; set image_dir (--train_data_dir with --in_json) to their folder or remove the entries"
        )
    if not records and not problems:
        problems.append(f"{path} lists no images; add entries like {_JSON_SHAPE}")
    if problems:
        raise UserError(*problems)
    return list(entries.values())

"""Fine-tune metadata sources: --in_json and subset metadata_file, JSON and JSONL, kohya's caption + tags
join, sizes from metadata, and every bad input as one line naming the file (line/column or key) and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from train_helpers import common_args, metadata, run_main

from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetDefaults, load_dataset_blueprint
from library.data.finetune import blueprint_from_metadata
from library.data.metadata_file import join_caption, read_metadata_file
from library.errors import UserError
from library.families.sd import StableDiffusionFamily

DEFAULTS = DatasetDefaults(resolution=(128, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)


def png(path: Path, w: int = 64, h: int = 64, color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *records: dict) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def problems_of(path: Path, image_dir: Path) -> list[str]:
    with pytest.raises(UserError) as info:
        read_metadata_file(path, image_dir)
    return info.value.problems


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


def test_kohya_caption_and_tags_join() -> None:
    assert join_caption("a dog", "brown, sitting", ",") == "a dog,brown, sitting"  # no space, like kohya
    assert join_caption("", "brown, sitting", ",") == "brown, sitting"
    assert join_caption("a dog", None, ",") == "a dog"
    assert join_caption("a dog", "", ";") == "a dog"
    assert join_caption("one\ntwo\n\n", "x\ny", ",", per_line=True) == "one,x,y\ntwo,x,y"  # wildcards


def test_json_metadata_keys_captions_and_sizes(tmp_path: Path) -> None:
    img = tmp_path / "img"
    png(img / "a.png")
    png(img / "b.jpg", 128, 64)
    png(img / "sub" / "c.webp")
    png(tmp_path / "elsewhere" / "d.png")
    meta = write(
        tmp_path / "meta.json",
        json.dumps(
            {
                "a": {"caption": "a red square", "tags": "red, square"},  # no extension: looked up
                "b.jpg": {"tags": "wide"},
                "sub/c.webp": {"caption": "only a caption"},
                str(tmp_path / "elsewhere" / "d.png"): {"caption": "absolute", "image_size": [640, 320]},
            }
        ),
    )
    entries = read_metadata_file(meta, img)
    assert [(e.path, e.caption, e.tags, e.size) for e in entries] == [
        (img / "a.png", "a red square,red, square", "red, square", None),
        (img / "b.jpg", "wide", "wide", None),
        (img / "sub" / "c.webp", "only a caption", None, None),
        (tmp_path / "elsewhere" / "d.png", "absolute", None, (640, 320)),
    ]


def test_jsonl_metadata_and_width_height(tmp_path: Path) -> None:
    png(tmp_path / "x.png")
    png(tmp_path / "y.png")
    meta = jsonl(
        tmp_path / "meta.jsonl",
        {"image_path": "x.png", "caption": "ex", "tags": "t1", "image_size": [96, 64]},
        {"image_path": "y.png", "caption": "why", "width": 64, "height": 128},
    )
    write(meta, meta.read_text() + "\n")  # a blank line is fine
    entries = read_metadata_file(meta, tmp_path, separator=";")
    assert [(e.path.name, e.caption, e.size) for e in entries] == [
        ("x.png", "ex;t1", (96, 64)),
        ("y.png", "why", (64, 128)),
    ]


def test_image_size_from_metadata_skips_the_header(tmp_path: Path) -> None:
    """With image_size the header is never read: a file that is not even an image still scans."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(b"not a png")
    png(tmp_path / "img" / "y.png", 64, 192)
    meta = jsonl(
        tmp_path / "meta.jsonl",
        {"image_path": "x.png", "caption": "x", "image_size": [192, 64]},
        {"image_path": "y.png", "caption": "y"},
    )
    (spec,) = blueprint_from_metadata(meta, tmp_path / "img", DEFAULTS)
    group = build_dataset_group([spec], seed=0)
    items = {i.path.name: i for i in group.datasets[0].items}
    assert (items["x.png"].original_size, items["x.png"].bucket) == ((192, 64), (192, 64))
    assert (items["y.png"].original_size, items["y.png"].bucket) == ((64, 192), (64, 192))  # from the header


def test_metadata_syntax_errors_name_file_line_and_column(tmp_path: Path) -> None:
    meta = write(tmp_path / "meta.json", '{\n  "a.png": {"caption": "x",}\n}\n')
    assert problems_of(meta, tmp_path) == [
        f"{meta}:2:28: not valid JSON: Expecting property name enclosed in double quotes (line 2, column 28); "
        'kohya\'s format is {"image.png": {"caption": "...", "tags": "..."}}'
    ]
    lines = write(
        tmp_path / "meta.jsonl", '{"image_path": "a.png"}\n{"image_path": "b.png" "caption": 1}\n[1]\n'
    )
    png(tmp_path / "a.png")
    assert problems_of(lines, tmp_path) == [
        f"{lines}:2:24: not valid JSON: Expecting ',' delimiter (line 2, column 24); each line must be one "
        'object like {"image_path": "...", "caption": "..."}',
        f'{lines}:3: each line must be one object like {{"image_path": "...", "caption": "..."}}; image_path is '
        "missing or not a string",
    ]


def test_metadata_field_types_and_missing_images_all_at_once(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    meta = write(
        tmp_path / "meta.json",
        json.dumps(
            {
                "a.png": {"caption": 3},
                "b.png": {"tags": ["x"], "image_size": [64]},
                "c.png": "a caption",
                **{f"gone{i}.png": {"caption": "x"} for i in range(7)},
            }
        ),
    )
    assert problems_of(meta, tmp_path / "img") == [
        f'{meta}: "c.png" must be an object like {{"caption": "..."}}, got "a caption"',
        f'{meta}: "a.png".caption must be a string, got 3',
        f'{meta}: "b.png".tags must be a string, got ["x"]',
        f'{meta}: "b.png".image_size must be [width, height] in pixels, got [64]',
        f"{meta}: 7 listed image(s) not found (relative keys are looked up in {tmp_path / 'img'}): gone0.png, "
        "gone1.png, gone2.png, gone3.png, gone4.png and 2 more; set image_dir (--train_data_dir with --in_json) "
        "to their folder or remove the entries",
    ]


def test_metadata_file_not_utf8_empty_or_not_an_object(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a.png": {"caption": "caf\xe9"}}')
    assert problems_of(bad, tmp_path) == [f"metadata file {bad} is not UTF-8 (byte 26); re-save it as UTF-8"]
    empty = write(tmp_path / "empty.json", "{}")
    assert problems_of(empty, tmp_path) == [
        f'{empty} lists no images; add entries like {{"image.png": {{"caption": "...", "tags": "..."}}}}'
    ]
    listed = write(tmp_path / "list.json", "[]")
    assert problems_of(listed, tmp_path) == [
        f'{listed}: the top level must be an object {{"image.png": {{"caption": "...", "tags": "..."}}}}, got list'
    ]


def test_metadata_file_subsets_in_a_dataset_toml(tmp_path: Path) -> None:
    png(tmp_path / "data" / "a.png")
    png(tmp_path / "data" / "b.png", 128, 64)
    jsonl(tmp_path / "data" / "meta.jsonl", {"image_path": "a.png", "caption": "ay", "tags": "t"})
    write(tmp_path / "other.json", json.dumps({"b.png": {"caption": "bee"}}))
    cfg = write(
        tmp_path / "ds.toml",
        """
[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
caption_separator = ";"

[[datasets]]
  [[datasets.subsets]]
  metadata_file = "data/meta.jsonl"      # image_dir defaults to the file's folder
  num_repeats = 3
  [[datasets.subsets]]
  metadata_file = "other.json"
  image_dir = "data"
""",
    )
    (spec,) = load_dataset_blueprint(cfg, DatasetDefaults())
    assert [(s.metadata_file, s.image_dir, s.num_repeats) for s in spec.subsets] == [
        (tmp_path / "data" / "meta.jsonl", tmp_path / "data", 3),
        (tmp_path / "other.json", tmp_path / "data", 1),
    ]
    group = build_dataset_group([spec], seed=0)
    ds = group.datasets[0]
    assert [(i.path.name, i.caption, i.num_repeats) for i in ds.items] == [
        ("a.png", "ay;t", 3),
        ("b.png", "bee", 1),
    ]
    assert ds.tag_frequency == {"meta.jsonl": {"t": 1}, "other.json": {}}  # kohya: tags only, per file
    (meta,) = group.dataset_metadata()
    assert meta["is_dreambooth"] is False
    assert meta["subsets"][0]["metadata_file"] == "meta.jsonl" and meta["subsets"][0]["image_dir"] == "data"
    assert "class_tokens" not in meta["subsets"][0] and "is_reg" not in meta["subsets"][0]
    assert group.dataset_dirs() == {
        "meta.jsonl": {"n_repeats": 3, "img_count": 1},
        "other.json": {"n_repeats": 1, "img_count": 1},
    }
    assert "meta.jsonl" in group.plan_text()


def test_metadata_subset_config_errors(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    write(tmp_path / "meta.json", "{}")
    cfg = write(
        tmp_path / "ds.toml",
        """
[general]
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = "imgs"
  [[datasets.subsets]]
  metadata_file = "meta.json"
  is_reg = true
  class_tokens = "dog"
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "missing.json"
  image_dir = "nowhere"
""",
    )
    with pytest.raises(UserError) as info:
        load_dataset_blueprint(cfg, DatasetDefaults())
    assert info.value.problems == [
        f"{cfg}: datasets[0].subsets[1].is_reg applies to DreamBooth subsets only (not with metadata_file); remove it",
        f"{cfg}: datasets[0].subsets[1].class_tokens applies to DreamBooth subsets only (not with metadata_file); "
        "remove it",
        f"{cfg}: datasets[0] mixes DreamBooth (image_dir only) and fine-tune (metadata_file) subsets, which kohya "
        "does not allow in one dataset; put them in separate [[datasets]]",
        f'{cfg}: datasets[1].subsets[0].metadata_file file "missing.json" does not exist (looked in '
        f"{tmp_path / 'missing.json'} and {Path.cwd() / 'missing.json'}); fix the path",
        f'{cfg}: datasets[1].subsets[0].image_dir folder "nowhere" does not exist (looked in '
        f"{tmp_path / 'nowhere'} and {Path.cwd() / 'nowhere'}); fix the path",
    ]


def test_in_json_trains_and_records_kohya_metadata(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "images"
    png(img / "r.png", color=(220, 30, 30))
    png(img / "g.png", color=(30, 200, 60))
    meta = write(
        tmp_path / "meta_cap.json",
        json.dumps(
            {"r": {"caption": "sks", "tags": "red, square"}, "g": {"caption": "sks", "tags": "green"}}
        ),
    )
    out = tmp_path / "out"
    argv = common_args(
        tiny_sd1_dir, out, "--in_json", str(meta), "--train_data_dir", str(img), "--resolution", "64",
        "--dataset_repeats", "2", "--max_train_steps", "2", "--metadata_include_paths",
    )  # fmt: skip
    assert run_main(argv) == 0
    md = metadata(out / "feat.safetensors")
    assert md["ss_num_train_images"] == "4"
    assert json.loads(md["ss_dataset_dirs"]) == {"meta_cap.json": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {}
    assert json.loads(md["ss_tag_frequency"]) == {"meta_cap.json": {"red": 1, "square": 1, "green": 1}}


def test_in_json_bad_input_before_weights(
    tiny_sd1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weights: None
) -> None:
    meta = write(tmp_path / "meta.json", '{"a.png": {"caption": "x"}')
    argv = common_args(tiny_sd1_dir, tmp_path / "out", "--in_json", str(meta), "--resolution", "64")
    assert run_main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {meta}:1:27: not valid JSON: Expecting ',' delimiter (line 1, column 27); kohya's format is "
        '{"image.png": {"caption": "...", "tags": "..."}}'
    ]
    argv = common_args(
        tiny_sd1_dir, tmp_path / "out", "--in_json", str(tmp_path / "nope.json"),
        "--reg_data_dir", str(tmp_path), "--resolution", "64",
    )  # fmt: skip
    assert run_main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --in_json: file {tmp_path / 'nope.json'} does not exist; check the path",
        "error: --reg_data_dir cannot be used with --in_json (fine-tune datasets have no regularization "
        "images); remove it, or use a --dataset_config with a DreamBooth dataset for them",
    ]

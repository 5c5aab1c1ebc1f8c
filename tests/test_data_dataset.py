"""Dataset group: scanning, reg balancing, plan, seeded batches, load_batch and the DataLoader adapter."""

from __future__ import annotations

import pickle
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from library.data.dataset import DatasetGroup, build_dataset_group
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.loader import EpochBatchDataset, EpochBatchSampler, identity_collate
from library.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def png(path: Path, w: int, h: int, color=(255, 0, 0), caption: str | None = "tag a, tag b") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)
    if caption is not None:
        path.with_suffix(".caption").write_text(caption, encoding="utf-8")
    return path


def subset(image_dir: Path, repeats: int = 1, *, is_reg: bool = False, **kw) -> SubsetSpec:
    values = dict(
        class_tokens=None,
        caption_extension=".caption",
        shuffle_caption=False,
        caption_separator=",",
        keep_tokens=0,
        caption_prefix=None,
        caption_suffix=None,
        flip_aug=False,
        random_crop=False,
    )
    values.update(kw)
    return SubsetSpec(image_dir=image_dir, num_repeats=repeats, is_reg=is_reg, **values)


def dataset(
    *subsets: SubsetSpec, resolution=(128, 128), batch_size=2, enable_bucket=True, **kw
) -> DatasetSpec:
    values = dict(min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64, bucket_no_upscale=False)
    values.update(kw)
    return DatasetSpec(resolution, batch_size, enable_bucket, subsets=tuple(subsets), **values)


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """5 images in 3 buckets (128x128, 192x64, 64x192) plus a file that is not an image."""
    d = tmp_path / "train"
    png(d / "a.png", 128, 128)
    png(d / "b.png", 128, 128, (0, 0, 255))
    png(d / "c.png", 192, 64)
    png(d / "d.PNG", 64, 200)
    png(d / "e.jpg", 130, 126)
    (d / "notes.txt").write_text("ignored")
    return d


def test_scan_buckets_and_plan(mixed: Path) -> None:
    group = build_dataset_group([dataset(subset(mixed, 3))], seed=0)
    ds = group.datasets[0]
    assert [i.path.name for i in ds.items] == ["a.png", "b.png", "c.png", "d.PNG", "e.jpg"]
    assert [(reso, len(members)) for reso, members in ds.buckets] == [
        ((64, 192), 3),
        ((128, 128), 9),
        ((192, 64), 3),
    ]
    assert group.num_batches_per_epoch == 2 + 5 + 2  # ceil(3/2) + ceil(9/2) + ceil(3/2)
    assert (group.num_train_images, group.num_reg_images) == (15, 0)
    assert ds.skipped == []
    text = group.plan_text()
    for needle in (
        "64x192",
        "128x128",
        "192x64",
        "9 batches per epoch",
    ):
        assert needle in text
    assert re.search(r"128x128\s+3\s+9\s+5", text)  # bucket, images, items, batches


def test_reg_shortfall_is_filled_round_robin(tmp_path: Path) -> None:
    for n in range(2):
        png(tmp_path / "train" / f"t{n}.png", 128, 128)
    for n in range(3):
        png(tmp_path / "reg" / f"r{n}.png", 128, 128, caption=None)
    spec = dataset(
        subset(tmp_path / "train", 5), subset(tmp_path / "reg", 1, is_reg=True, class_tokens="dog")
    )
    group = build_dataset_group([spec], seed=0, prior_loss_weight=0.5)
    ds = group.datasets[0]
    reg = [i for i in ds.items if i.is_reg]
    assert [i.num_repeats for i in reg] == [4, 3, 3]  # 3 registered, then +1 round-robin up to 10
    assert (ds.num_train_images, ds.num_reg_images) == (10, 3)
    assert reg[0].caption == "dog"
    assert "regularization repeats raised from 3 to 10" in group.plan_text()


def test_reg_surplus_is_dropped(tmp_path: Path) -> None:
    png(tmp_path / "train" / "t.png", 128, 128)
    for n in range(5):
        png(tmp_path / "reg" / f"r{n}.png", 128, 128)
    spec = dataset(subset(tmp_path / "train", 3), subset(tmp_path / "reg", 2, is_reg=True))
    ds = build_dataset_group([spec], seed=0).datasets[0]
    reg = [i for i in ds.items if i.is_reg]
    assert [(i.path.name, i.num_repeats) for i in reg] == [("r0.png", 2), ("r1.png", 2)]  # 4 >= 3: stop
    assert ds.num_reg_images == 10
    assert ds.notes == [
        "3 of 5 regularization images are not used: 2 already match the 3 training images (with repeats)"
    ]


def test_scan_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"no images in {re.escape(str(tmp_path / 'empty'))}"):
        build_dataset_group([dataset(subset(tmp_path / "empty"))], seed=0)
    png(tmp_path / "nocap" / "x.png", 64, 64, caption=None)
    (tmp_path / "nocap" / "x.txt").write_text("a caption")
    with pytest.raises(UserError) as info:
        build_dataset_group([dataset(subset(tmp_path / "nocap"))], seed=0)
    assert "have no caption file (.caption) and the folder has no class_tokens: x.png" in str(info.value)
    assert 'set caption_extension = ".txt"' in str(info.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    png(tmp_path / "bad" / "y.png", 64, 64)
    ds = build_dataset_group([dataset(subset(tmp_path / "bad"))], seed=0).datasets[0]
    assert [i.path.name for i in ds.items] == ["y.png"]  # an unreadable image is skipped and listed
    assert ds.skipped == [(tmp_path / "bad" / "x.png", "unreadable (unknown or corrupt image format)")]
    with pytest.raises(UserError) as info:  # and with strict_dataset an error
        build_dataset_group([dataset(subset(tmp_path / "bad"))], seed=0, strict_dataset=True)
    assert info.value.problems == [
        f"cannot read image {tmp_path / 'bad' / 'x.png'}: unknown or corrupt image format; fix or remove the file"
    ]
    png(tmp_path / "tiny" / "x.png", 8, 8)
    with pytest.raises(UserError, match="every image in .* was skipped .*x.png: 8x8 is smaller"):
        build_dataset_group([dataset(subset(tmp_path / "tiny"), bucket_no_upscale=True)], seed=0)
    png(tmp_path / "regonly" / "x.png", 64, 64)
    with pytest.raises(UserError, match="only regularization images"):
        build_dataset_group([dataset(subset(tmp_path / "regonly", is_reg=True))], seed=0)
    with pytest.raises(UserError, match="bucket_reso_steps 4 must be a multiple"):
        build_dataset_group([dataset(subset(tmp_path / "regonly"), bucket_reso_steps=4)], seed=0)


def test_batch_order_deterministic_and_covers_every_repeat(mixed: Path) -> None:
    spec = dataset(subset(mixed, 4), batch_size=1)
    group = build_dataset_group([spec], seed=7)
    again = build_dataset_group([spec], seed=7)
    assert group.batch_order(0) == again.batch_order(0)
    assert sorted(group.batch_order(0)) == list(range(group.num_batches_per_epoch))
    assert group.batch_order(0) != group.batch_order(1)
    assert group.batch_order(0) != build_dataset_group([spec], seed=8).batch_order(0)
    seen = Counter(
        i.path.name for step in range(group.num_batches_per_epoch) for i in group.batch_items(1, step)[1]
    )
    assert seen == {name: 4 for name in ("a.png", "b.png", "c.png", "d.PNG", "e.jpg")}


def test_load_batch_contents(tmp_path: Path) -> None:
    png(tmp_path / "t" / "red.png", 128, 128, (255, 0, 0), caption="red, square")
    png(tmp_path / "r" / "blue.png", 81, 128, (0, 0, 255), caption="blue")
    spec = dataset(
        subset(tmp_path / "t", 1, caption_prefix="sks"),
        subset(tmp_path / "r", 1, is_reg=True),
        enable_bucket=False,
        batch_size=2,
    )
    group = build_dataset_group([spec], seed=0, prior_loss_weight=0.25)
    batch = group.load_batch(0, 0)
    assert batch["latents"] is None
    images = batch["images"]
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    by_name = {Path(p).name: i for i, p in enumerate(batch["image_paths"])}
    red, blue = by_name["red.png"], by_name["blue.png"]
    assert images[red, :, 5, 5].tolist() == [1.0, -1.0, -1.0]
    assert batch["captions"][red] == "sks red, square" and batch["captions"][blue] == "blue"
    assert batch["loss_weights"][[red, blue]].tolist() == [1.0, 0.25]
    assert batch["original_sizes_hw"][blue].tolist() == [128, 81]
    assert batch["target_sizes_hw"][blue].tolist() == [128, 128]
    assert batch["crop_top_lefts"][blue].tolist() == [0, 23]  # kohya crop_ltrb (23, 0, 104, 128)
    assert batch["flipped"] == [False, False]
    assert batch["original_sizes_hw"].dtype == torch.int64


def test_flip_and_caption_shuffle_are_seeded(tmp_path: Path) -> None:
    image = Image.new("RGB", (81, 128), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 81, 128))  # left red, right blue
    (tmp_path / "t").mkdir()
    image.save(tmp_path / "t" / "x.png")
    (tmp_path / "t" / "x.caption").write_text("a, b, c, d, e")
    spec = dataset(
        subset(tmp_path / "t", 16, flip_aug=True, shuffle_caption=True), enable_bucket=False, batch_size=1
    )
    group = build_dataset_group([spec], seed=3)
    batches = [group.load_batch(0, s) for s in range(16)]
    flips = [b["flipped"][0] for b in batches]
    assert any(flips) and not all(flips)
    for b in batches:
        left_is_blue = b["images"][0, 2, 64, 0].item() == 1.0
        assert left_is_blue == b["flipped"][0]
        assert b["crop_top_lefts"][0].tolist() == ([0, 24] if b["flipped"][0] else [0, 23])
    assert len({b["captions"][0] for b in batches}) > 1
    again = build_dataset_group([spec], seed=3)
    for s in (0, 5, 15):
        other = again.load_batch(0, s)
        assert other["captions"] == batches[s]["captions"] and other["flipped"] == batches[s]["flipped"]
        assert torch.equal(other["images"], batches[s]["images"])


def test_sampler_resume_mid_epoch_with_workers(mixed: Path) -> None:
    group = build_dataset_group([dataset(subset(mixed, 2, shuffle_caption=True))], seed=5)
    group = pickle.loads(pickle.dumps(group))
    loader = DataLoader(
        EpochBatchDataset(group),
        batch_size=None,
        sampler=EpochBatchSampler(group, epoch=2, start_step=3),
        num_workers=2,
        collate_fn=identity_collate,
    )
    resumed = list(loader)
    assert len(resumed) == group.num_batches_per_epoch - 3
    for step, batch in enumerate(resumed, start=3):
        expected = group.load_batch(2, step)
        assert batch["image_paths"] == expected["image_paths"] and batch["captions"] == expected["captions"]
        assert torch.equal(batch["images"], expected["images"])


def test_multiple_datasets_and_metadata(tmp_path: Path) -> None:
    png(tmp_path / "a" / "x.png", 128, 128, caption="Cat, cute")
    png(tmp_path / "a" / "y.png", 192, 64, caption="cat")
    png(tmp_path / "b" / "z.png", 300, 200, caption="dog")
    specs = [
        dataset(subset(tmp_path / "a", 2, flip_aug=True), batch_size=2),
        dataset(subset(tmp_path / "b", 1), resolution=(256, 256), batch_size=1, bucket_no_upscale=True),
    ]
    group: DatasetGroup = build_dataset_group(specs, seed=0)
    assert group.num_batches_per_epoch == 1 + 1 + 1
    for step in range(group.num_batches_per_epoch):
        batch = group.load_batch(0, step)
        assert len({tuple(t) for t in batch["target_sizes_hw"].tolist()}) == 1
    assert group.bucket_info() == {
        "buckets": {
            0: {"resolution": [128, 128], "count": 2},
            1: {"resolution": [192, 64], "count": 2},
            2: {"resolution": [256, 192], "count": 1},
        },
        "mean_img_ar_error": pytest.approx((0 + 0 + abs(256 / 192 - 1.5)) / 3),
    }
    meta = group.dataset_metadata()
    assert meta[0]["num_train_images"] == 4 and meta[0]["batch_size_per_device"] == 2
    assert meta[0]["resolution"] == [128, 128] and meta[0]["min_bucket_reso"] == 64
    assert meta[0]["subsets"][0] == {
        "img_count": 2,
        "num_repeats": 2,
        "color_aug": False,
        "flip_aug": True,
        "random_crop": False,
        "shuffle_caption": False,
        "keep_tokens": 0,
        "keep_tokens_separator": "",
        "secondary_separator": None,
        "enable_wildcard": False,
        "caption_prefix": None,
        "caption_suffix": None,
        "caption_dropout_rate": 0.0,
        "caption_dropout_every_n_epochs": 0,
        "caption_tag_dropout_rate": 0.0,
        "token_warmup_min": 1,
        "token_warmup_step": 0.0,
        "image_dir": "a",
        "class_tokens": None,
        "is_reg": False,
    }
    assert group.tag_frequency() == {"a": {"cat": 2, "cute": 1}, "b": {"dog": 1}}
    assert group.dataset_dirs() == {
        "a": {"n_repeats": 2, "img_count": 2},
        "b": {"n_repeats": 1, "img_count": 1},
    }


def test_data_package_never_imports_families_or_networks() -> None:
    for source in (REPO / "library" / "data").glob("*.py"):
        text = source.read_text()
        assert not re.search(r"^\s*(from|import)\s+(library\.families|networks)", text, re.M), source.name


def test_unreadable_image_at_load_time_names_the_file(tmp_path: Path) -> None:
    path = png(tmp_path / "t" / "x.png", 64, 64)
    group = build_dataset_group([dataset(subset(tmp_path / "t"), resolution=(64, 64))], seed=0)
    path.write_bytes(path.read_bytes()[:60])  # truncated after the header was read
    group.strict = True  # (without it the batch would use another image; here there is none)
    with pytest.raises(UserError, match=f"cannot read image {re.escape(str(path))}: image file is truncated"):
        group.load_batch(0, 0)

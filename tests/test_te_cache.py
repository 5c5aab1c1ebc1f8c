"""Text-encoder output caching (--cache_text_encoder_outputs, _to_disk, tools/cache_text_encoder_outputs.py):
the same LoRA and validation loss as without it, no text-encoder call per step, kohya's npz files reused
exactly when valid, and every incompatible option an error before any weights load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import db_args, make_images, run_main

import library.training.run as R
import library.training.te_cache as te_cache
from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.text_cache import TextEncoderCache, cache_text_outputs, fixed_caption, write_npz
from library.entry import main
from library.errors import UserError
from library.families.sd import StableDiffusionFamily
from library.training.validation import Validator
from tools.cache_text_encoder_outputs import main as tool_main

HIDDEN = 64  # the tiny SD1 text encoder's width
CACHE = ("--network_train_unet_only", "--cache_text_encoder_outputs")


def train(model: Path, data: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    argv = db_args(model, data, out, "--max_train_steps", "2", "--caption_prefix", "photo of", *extra)
    assert run_main(argv) == 0
    return load_file(str(out / "feat.safetensors"))


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> list:
    """The report of every cache filled in this test."""
    seen = []

    def spy(*args, **kwargs):
        cache = real(*args, **kwargs)
        seen.append((cache.report.encoded, cache.report.reused))
        return cache

    real = te_cache.cache_text_outputs
    monkeypatch.setattr(te_cache, "cache_text_outputs", spy)
    return seen


# ------------------------------------------------------------------------------------ training


def test_cached_run_trains_the_same_lora_and_validation_loss(
    tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_images(tmp_path / "data", n=4)
    losses: list[float] = []
    real_loss = Validator.loss

    def record(self, *args):
        losses.append(real_loss(self, *args))
        return losses[-1]

    monkeypatch.setattr(Validator, "loss", record)
    split = ("--validation_split", "0.5", "--validate_every_n_steps", "1")
    plain = train(tiny_sd1_dir, data, tmp_path / "plain", "--network_train_unet_only", *split)
    cached = train(tiny_sd1_dir, data, tmp_path / "cached", *CACHE, *split)
    assert plain.keys() == cached.keys() and len(plain) == 48 * 3  # UNet modules only: down, up, alpha
    for key, value in plain.items():
        torch.testing.assert_close(cached[key], value, rtol=0, atol=1e-6)
    assert len(losses) == 4  # 2 validations per run
    assert losses[2:] == pytest.approx(losses[:2], rel=0, abs=1e-6)


def test_text_encoder_stays_on_cpu_and_only_sampling_calls_it(
    tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reports: list
) -> None:
    data = make_images(tmp_path / "data", n=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape --w 64 --h 64 --s 1 --d 5\n")
    calls: list[str] = []
    runs = []

    def prepare(config, family):
        run = real_prepare(config, family)
        (te,) = run.bundle.text_encoders
        te.register_forward_hook(lambda *_: calls.append(str(next(te.parameters()).device)))
        runs.append(run)
        return run

    real_prepare = R.prepare
    monkeypatch.setattr(R, "prepare", prepare)
    sampling = ("--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first")
    train(tiny_sd1_dir, data, tmp_path / "out", *CACHE, *sampling)
    # Two samplings (step 0 and 2), each encoding the prompt and the negative prompt; no call per step.
    assert len(calls) == 4
    (run,) = runs
    assert next(run.bundle.text_encoders[0].parameters()).device.type == "cpu"
    cache = run.step_options.text_cache
    assert sorted(cache.entries) == ["photo of sks shape, green", "photo of sks shape, red"]
    assert cache.entries["photo of sks shape, red"]["encoder_hidden_states"].shape == (77, HIDDEN)
    assert reports == [(2, 0)]


def test_disk_cache_files_reuse_and_a_changed_caption(
    tiny_sd1_dir: Path, tmp_path: Path, reports: list, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_images(tmp_path / "data", n=2)
    folder = data / "2_sks shape"
    disk = ("--network_train_unet_only", "--cache_text_encoder_outputs_to_disk", "--overwrite")
    first = train(tiny_sd1_dir, data, tmp_path / "out", *disk)
    files = sorted(p.name for p in folder.glob("*.npz"))
    assert files == ["img0_te_outputs.npz", "img1_te_outputs.npz"]
    with np.load(folder / "img0_te_outputs.npz") as npz:
        assert sorted(npz.files) == ["cache_id", "caption", "encoder_hidden_states"]
        assert npz["encoder_hidden_states"].shape == (77, HIDDEN)
        assert npz["encoder_hidden_states"].dtype == np.float32
        assert str(npz["caption"]) == "photo of sks shape, red"
        assert str(npz["cache_id"]).startswith("sd:tiny-sd1:")
    stamp0 = (folder / "img0_te_outputs.npz").stat().st_mtime_ns

    again = train(tiny_sd1_dir, data, tmp_path / "out", *disk)
    assert reports[:2] == [(2, 0), (0, 2)]
    for key, value in first.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)

    (folder / "img1.caption").write_text("sks shape, purple")
    capsys.readouterr()
    train(tiny_sd1_dir, data, tmp_path / "out", *disk, "--dry_run")  # the plan reads two small keys per file
    assert "Text-encoder output cache (disk): 1 valid cache files reused, 1 images to encode" in (
        capsys.readouterr().out.splitlines()
    )
    assert len(reports) == 2
    train(tiny_sd1_dir, data, tmp_path / "out", *disk)
    assert reports[2] == (1, 1)
    assert (folder / "img0_te_outputs.npz").stat().st_mtime_ns == stamp0
    with np.load(folder / "img1_te_outputs.npz") as npz:
        assert str(npz["caption"]) == "photo of sks shape, purple"

    train(tiny_sd1_dir, data, tmp_path / "out", *disk, "--clip_skip", "2")  # another encoding: all stale
    assert reports[3] == (2, 0)


def test_tool_writes_the_files_training_reuses(tiny_sd1_dir: Path, tmp_path: Path, capsys, reports) -> None:
    data = make_images(tmp_path / "data", n=2)
    args = ["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(data)]
    # --network_dim: a training flag, ignored
    args += ["--resolution", "64", "--caption_prefix", "photo of", "--network_dim", "8"]
    assert tool_main(args) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "text-encoder outputs cached to disk: 2 encoded, 0 reused"
    )
    assert sorted(p.name for p in (data / "2_sks shape").glob("*.npz")) == [
        "img0_te_outputs.npz",
        "img1_te_outputs.npz",
    ]
    train(
        tiny_sd1_dir,
        data,
        tmp_path / "out",
        "--network_train_unet_only",
        "--cache_text_encoder_outputs_to_disk",
    )
    assert reports == [(2, 0), (0, 2)]

    capsys.readouterr()
    assert tool_main(["--train_data_dir", str(data)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --pretrained_model_name_or_path is required (its text encoders encode the captions)"
    ]


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


def errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(argv, prog="train_network.py", family="sd", description="t") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]


def test_text_encoder_training_is_refused(tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights) -> None:
    data = make_images(tmp_path / "data", n=2)
    for flag in ("--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"):
        assert errors(db_args(tiny_sd1_dir, data, tmp_path / "out", flag), capsys) == [
            f"{flag} needs --network_train_unet_only: a text-encoder LoRA changes the text encoder's outputs at "
            f"every step, so they cannot be cached; add --network_train_unet_only or remove {flag}"
        ]


def test_random_caption_options_are_refused_per_subset(
    tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights
) -> None:
    data = make_images(tmp_path / "data", n=2)
    sub = data / "2_sks shape"
    randoms = [
        ("--shuffle_caption", None, "shuffle_caption", "true"),
        ("--caption_dropout_rate", "0.1", "caption_dropout_rate", "0.1"),
        ("--caption_dropout_every_n_epochs", "2", "caption_dropout_every_n_epochs", "2"),
        ("--caption_tag_dropout_rate", "0.2", "caption_tag_dropout_rate", "0.2"),
        ("--token_warmup_step", "5", "token_warmup_step", "5.0"),
        ("--enable_wildcard", None, "enable_wildcard", "true"),
    ]
    argv = db_args(tiny_sd1_dir, data, tmp_path / "out", *CACHE)
    for flag, value, _, _ in randoms:
        argv += [flag] if value is None else [flag, value]
    assert errors(argv, capsys) == [
        f"--cache_text_encoder_outputs is not compatible with {option}: dataset 1 subset 1 ({sub}) has "
        f"{option} = {shown} (cached outputs would freeze one version of each caption); remove {option} there "
        f"(or --{option}) or remove --cache_text_encoder_outputs"
        for _, _, option, shown in randoms
    ]


def test_dataset_config_names_the_dataset_and_subset(
    tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights
) -> None:
    data = make_images(tmp_path / "data", n=2)
    shutil.copytree(data / "2_sks shape", tmp_path / "other")
    toml = tmp_path / "ds.toml"
    toml.write_text(
        "[general]\nresolution = 64\ncaption_extension = '.caption'\n"
        f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{data / '2_sks shape'}'\n"
        f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{data / '2_sks shape'}'\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'other'}'\n  caption_tag_dropout_rate = 0.5\n"
    )
    argv = [a for a in db_args(tiny_sd1_dir, data, tmp_path / "out", "--cache_text_encoder_outputs_to_disk")]
    argv = argv[: argv.index("--train_data_dir")] + argv[argv.index("--resolution") + 2 :]
    argv += ["--dataset_config", str(toml), "--network_train_unet_only"]
    flag = "--cache_text_encoder_outputs_to_disk"
    assert errors(argv, capsys) == [
        f"{flag} is not compatible with caption_tag_dropout_rate: dataset 2 subset 2 ({tmp_path / 'other'}) has "
        "caption_tag_dropout_rate = 0.5 (cached outputs would freeze one version of each caption); remove "
        f"caption_tag_dropout_rate there (or --caption_tag_dropout_rate) or remove {flag}"
    ]


# ------------------------------------------------------------------------------------ the cache itself


class CaptionEncoder:
    """A stand-in text encoder: two batch-first outputs derived from the caption's characters; counts calls."""

    def __init__(self) -> None:
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.captions += captions
        codes = torch.tensor([[float(ord(c)) for c in caption.ljust(8)[:8]] for caption in captions])
        return {"hidden_state1": codes.view(-1, 2, 4), "pool2": codes.sum(dim=1, keepdim=True)}


def group_of(root: Path, captions: dict[str, str], **subset_options: object):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for name, caption in captions.items():
        if not (root / f"{name}.png").exists():
            Image.new("RGB", (64, 64), (10, 20, 30)).save(root / f"{name}.png")
        (root / f"{name}.caption").write_text(caption)
    subset = SubsetSpec(
        root, 1, False, None, ".caption", False, ",", 0, "p", "s", False, False, **subset_options
    )
    return build_dataset_group([DatasetSpec((64, 64), 2, False, 64, 64, 64, False, (subset,))], seed=0)


def test_captions_deduplicated_keys_and_lookup(tmp_path: Path) -> None:
    group = group_of(tmp_path / "img", {"a": "x|||y;;;z", "b": "x|||y;;;z", "c": "w"},
                     keep_tokens_separator="|||", secondary_separator=";;;")  # fmt: skip
    encoder = CaptionEncoder()
    cache = cache_text_outputs(
        [group], encoder, cache_id="e", to_disk=False, batch_size=8, show_progress=False
    )
    # The dataset's own pipeline: prefix/suffix, the keep-tokens separator joined away, ";;;" -> ","
    assert sorted(cache.entries) == ["p w s", "p x, y,z s"]
    assert encoder.captions == ["p w s", "p x, y,z s"]
    assert (cache.report.encoded, cache.report.reused, cache.report.to_disk) == (2, 0, False)
    assert not list((tmp_path / "img").glob("*.npz"))
    batch = group.load_batch(0, 0)
    looked_up = cache.lookup(batch["captions"])
    assert looked_up["hidden_state1"].shape == (2, 2, 4) and looked_up["pool2"].shape == (2, 1)
    expected = encoder(batch["captions"])
    assert all(torch.equal(looked_up[k], expected[k]) for k in expected)
    ds = group.datasets[0]
    assert {fixed_caption(i, ds.subset(i)) for i in ds.items} == {"p w s", "p x, y,z s"}
    with pytest.raises(RuntimeError, match="'unseen' is not in the text-encoder output cache"):
        TextEncoderCache(cache.entries).lookup(["unseen"])


def test_stale_kohya_corrupt_and_misshapen_files_are_rewritten(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    group = group_of(folder, {"a": "one", "b": "two", "c": "three", "d": "four"})

    def fill(encoder: CaptionEncoder, cache_id: str = "e") -> TextEncoderCache:
        return cache_text_outputs(
            [group], encoder, cache_id=cache_id, to_disk=True, batch_size=2, show_progress=False
        )

    first = fill(CaptionEncoder())
    assert (first.report.encoded, first.report.reused) == (4, 0)
    with np.load(folder / "a_te_outputs.npz") as npz:
        assert sorted(npz.files) == ["cache_id", "caption", "hidden_state1", "pool2"]
        assert npz["hidden_state1"].shape == (2, 4) and npz["pool2"].shape == (1,)
    np.savez(folder / "a_te_outputs.npz", hidden_state1=np.zeros((2, 4)), pool2=np.zeros(1))  # kohya's keys
    (folder / "b_te_outputs.npz").write_bytes(b"PK\x03\x04 not a zip")
    misshapen = {"hidden_state1": torch.zeros(3, 3), "pool2": torch.zeros(1)}
    write_npz(folder / "c_te_outputs.npz", misshapen, "p three s", "e")  # right ids, would not stack
    encoder = CaptionEncoder()
    again = fill(encoder)
    assert (again.report.encoded, again.report.reused) == (3, 1)
    assert encoder.captions == ["p one s", "p two s", "p three s"]
    assert all(
        torch.equal(again.entries[c]["hidden_state1"], first.entries[c]["hidden_state1"])
        for c in first.entries
    )
    with np.load(folder / "c_te_outputs.npz") as npz:
        assert npz["hidden_state1"].shape == (2, 4)
    other = fill(CaptionEncoder(), "f")
    assert (other.report.encoded, other.report.reused) == (4, 0)


def test_an_image_with_two_captions_cannot_share_one_disk_file(tmp_path: Path) -> None:
    flag = "--cache_text_encoder_outputs_to_disk"
    folder = tmp_path / "img"
    group = group_of(folder, {"a": "one"})
    twice = build_dataset_group(
        [group.datasets[0].spec, DatasetSpec((64, 64), 1, False, 64, 64, 64, False, (
            SubsetSpec(folder, 1, False, None, ".caption", False, ",", 0, None, None, False, False),))],
        seed=0,
    )  # fmt: skip
    with pytest.raises(UserError) as info:
        cache_text_outputs(
            [twice],
            CaptionEncoder(),
            cache_id="e",
            to_disk=True,
            batch_size=2,
            flag=flag,
            show_progress=False,
        )
    assert info.value.problems == [
        f"{folder / 'a.png'} is used with two captions ('p one s' and 'one') but its a_te_outputs.npz holds one; "
        "cache in RAM (--cache_text_encoder_outputs instead of --cache_text_encoder_outputs_to_disk) or give "
        "both subsets the same caption settings"
    ]
    ram = cache_text_outputs(
        [twice], CaptionEncoder(), cache_id="e", to_disk=False, batch_size=2, show_progress=False
    )
    assert sorted(ram.entries) == ["one", "p one s"]


def test_sdxl_outputs_have_kohya_keys_and_train_the_same_lora(
    tiny_sdxl_dir: Path, tmp_path: Path, capsys, reports: list
) -> None:
    from train_helpers import run_sdxl

    from library.families.tiny_sdxl import TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION

    data = make_images(tmp_path / "data", n=2)

    def sdxl(out: Path, *extra: str) -> dict[str, torch.Tensor]:
        argv = db_args(
            tiny_sdxl_dir, data, out, "--max_train_steps", "2", "--network_train_unet_only", *extra
        )
        assert run_sdxl(argv) == 0
        return load_file(str(out / "feat.safetensors"))

    plain = sdxl(tmp_path / "plain")
    tool = ["--sdxl", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--train_data_dir", str(data)]
    # Training's batch size, so the tool encodes the same batches (a batched matmul may differ in the last bit).
    assert tool_main([*tool, "--resolution", "64", "--train_batch_size", "2"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "text-encoder outputs cached to disk: 2 encoded, 0 reused"
    )
    with np.load(data / "2_sks shape" / "img1_te_outputs.npz") as npz:
        shapes = {key: npz[key].shape for key in npz.files}
        assert str(npz["cache_id"]).startswith("sdxl:tiny-sdxl:")
    assert shapes == {
        "hidden_state1": (77, TE1_HIDDEN),
        "hidden_state2": (77, TE2_HIDDEN),
        "pool2": (TE2_PROJECTION,),
        "caption": (),
        "cache_id": (),
    }
    cached = sdxl(tmp_path / "cached", "--cache_text_encoder_outputs_to_disk")
    assert reports == [(2, 0), (0, 2)]
    assert plain.keys() == cached.keys()
    for key, value in plain.items():
        torch.testing.assert_close(cached[key], value, rtol=0, atol=1e-6)

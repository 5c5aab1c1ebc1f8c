"""Bad input, end to end through the real entry point: one line per problem naming the flag/key/file and the
fix, exit code 2, no traceback, before any weights load where the problem is knowable without them, and a
failed run never replaces an existing output file.

Cases that need no weights run with the family's `load` replaced by an assertion (`no_weights`), which proves
the ordering: the run must stop on the user error before that assertion could fire.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from library.entry import main
from library.errors import UserError
from library.families.sd import StableDiffusionFamily
from library.families.tiny import TinySingleFile

ROOT = Path(__file__).resolve().parent.parent
EARLIER = b"LoRA bytes of an earlier run"
FOLDER_CONTENTS = (
    "a diffusers SD folder holds model_index.json and unet/, vae/, text_encoder/ (each with config.json and "
    "weights) plus tokenizer/ (or pass a single .safetensors/.ckpt file)"
)


def make_dataset(root: Path, n: int = 4) -> Path:
    """`<root>/img/2_sks shape/` with n 64x64 PNGs and .caption files; returns `<root>/img`."""
    folder = root / "img" / "2_sks shape"
    folder.mkdir(parents=True)
    for i in range(n):
        image = Image.new("RGB", (64, 64), (60 * i, 120, 200))
        image.paste((255, 255, 255), (8 * i, 16, 8 * i + 16, 40))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text(f"sks shape, {i}")
    return root / "img"


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--resolution", "64",
        "--output_dir", str(out),
        "--output_name", "e2e",
        "--network_dim", "4",
        "--learning_rate", "1e-3",
        "--seed", "3",
        "--train_batch_size", "2",
        "--max_train_steps", "2",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]  # fmt: skip


def run_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run the entry point in-process; assert exit code 2 and no traceback; return the error lines."""
    rc = main(argv, prog="train_network.py", family="sd", description="t")
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    return [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def truncate(path: Path) -> None:
    """Keep the PNG signature and IHDR chunk: the size reads fine, decoding fails."""
    path.write_bytes(path.read_bytes()[:60])


def damage(path: Path) -> str:
    """Flip bytes inside the compressed pixels; header and end stay intact, so only decoding finds it.
    Returns PIL's message for it."""
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 8):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(OSError) as info, Image.open(path) as image:
        image.load()
    return str(info.value)


# ------------------------------------------------------------------------------------ missing paths


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (
            "--pretrained_model_name_or_path",
            "--pretrained_model_name_or_path: model {p} does not exist; pass a local diffusers folder or "
            ".safetensors/.ckpt file (hub ids are not downloaded)",
        ),
        ("--train_data_dir", "--train_data_dir: folder {p} does not exist; check the path"),
        ("--dataset_config", "--dataset_config: file {p} does not exist; check the path"),
        ("--vae", "--vae: path {p} does not exist; check the path"),
        ("--network_weights", "--network_weights: path {p} does not exist; check the path"),
        ("--resume", "--resume: {p} is not a folder (pass a *-state folder written by --save_state)"),
    ],
)
def test_nonexistent_path_is_named(
    flag: str, expected: str, tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    missing = tmp_path / "missing"
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out") + [flag, str(missing)]  # the last value wins
    assert run_errors(argv, capsys) == [expected.format(p=missing)]
    assert not (tmp_path / "out").exists()


def test_incomplete_resume_state(tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights) -> None:
    state = tmp_path / "e2e-state"
    state.mkdir()
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out", "--resume", str(state))
    assert run_errors(argv, capsys) == [
        f"--resume: {state} has no train_state.json; it is not a state saved by --save_state"
    ]
    (state / "train_state.json").write_text("{}")
    (state / "network.safetensors").write_bytes(b"")
    assert run_errors(argv, capsys) == [
        f"--resume: {state} is missing optimizer.pt, scheduler.pt, rng.pt; the state is incomplete: resume "
        "from another *-state folder"
    ]


def test_resume_with_a_different_network(tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys) -> None:
    first = base_args(tiny_sd1_dir, data, tmp_path / "a", "--max_train_steps", "1", "--save_state")
    assert main(first, prog="train_network.py", family="sd", description="t") == 0
    state = tmp_path / "a" / "e2e-state"
    argv = base_args(tiny_sd1_dir, data, tmp_path / "b", "--resume", str(state), "--network_dim", "8")
    (error,) = run_errors(argv, capsys)
    assert error.startswith(f"--resume: {state} was saved for a different network (")
    assert error.endswith(
        "use the same --network_dim, --network_args and --network_train_* flags as the run that saved it"
    )
    assert not (tmp_path / "b").exists()


def test_dataset_config_that_is_a_folder(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out", "--dataset_config", str(data))
    assert run_errors(argv, capsys) == [f"dataset config {data} is a folder; pass the .toml file inside it"]


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize(
    ("broken", "missing"),
    [
        ("vae", "vae/config.json, vae/diffusion_pytorch_model.safetensors"),
        ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
    ],
)
def test_model_folder_missing_a_component(
    broken: str, missing: str, tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, model)
    target = model / broken
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    assert run_errors(base_args(model, data, tmp_path / "out"), capsys) == [
        f"--pretrained_model_name_or_path: {model} is missing {missing}; {FOLDER_CONTENTS}"
    ]


def test_corrupt_weights_are_named(
    tiny_sd1_dir: Path, tiny_sd1_single_file: TinySingleFile, data: Path, tmp_path: Path, capsys
) -> None:
    """Weights that exist but cannot be read fail while loading, still as one line naming the file."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, model)
    (model / "text_encoder" / "model.safetensors").write_bytes(b"\x08" + b"\0" * 15)
    (errors,) = run_errors(base_args(model, data, tmp_path / "out"), capsys)
    assert errors.startswith(f"--pretrained_model_name_or_path: cannot load {model / 'text_encoder'} (")
    assert errors.endswith(
        "its weights are truncated, corrupt or do not match its config.json: download it again"
    )

    vae = tmp_path / "vae.safetensors"
    raw = tiny_sd1_single_file.checkpoint.read_bytes()
    vae.write_bytes(raw[: 8 + int.from_bytes(raw[:8], "little") + 4096])  # a valid header, payload cut off
    (errors,) = run_errors(base_args(tiny_sd1_dir, data, tmp_path / "out", "--vae", str(vae)), capsys)
    assert errors.startswith(f"--vae: {vae} is not a readable .safetensors file (")
    assert errors.endswith("it is truncated or corrupt: download or save it again")


# ---------------------------------------------------------------------------------------- dataset


def test_empty_image_folder(tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights) -> None:
    folder = tmp_path / "img" / "2_sks shape"
    folder.mkdir(parents=True)
    assert run_errors(base_args(tiny_sd1_dir, tmp_path / "img", tmp_path / "out"), capsys) == [
        f"no images in {folder} (looked for .png .jpg .jpeg .webp .bmp; sub-folders are not searched); add "
        "images or remove this folder from the dataset"
    ]


def test_folder_name_without_repeats(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    (data / "2_sks shape").rename(data / "sks dog")
    assert run_errors(base_args(tiny_sd1_dir, data, tmp_path / "out"), capsys) == [
        f"--train_data_dir: {data / 'sks dog'} is not named <repeats>_<class tokens>; rename it to e.g. "
        "10_sks dog"
    ]


def test_unreadable_images_with_strict_dataset(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    """With --strict_dataset, empty, unknown and truncated files are errors found by the scan (the truncated
    one has a readable header: its missing end gives it away), all reported before any weights load."""
    empty, unknown, cut = (data / "2_sks shape" / f"img{i}.png" for i in range(3))
    empty.write_bytes(b"")
    unknown.write_bytes(b"not a png at all")
    truncate(cut)
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out", "--strict_dataset")
    assert run_errors(argv, capsys) == [
        f"cannot read image {empty}: empty file (0 bytes); fix or remove the file",
        f"cannot read image {unknown}: unknown or corrupt image format; fix or remove the file",
        f"cannot read image {cut}: image file is truncated; fix or remove the file",
    ]


def test_unreadable_images_are_skipped_and_listed(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys
) -> None:
    folder = data / "2_sks shape"
    empty, unknown, cut = (folder / f"img{i}.png" for i in range(3))
    empty.write_bytes(b"")
    unknown.write_bytes(b"not a png at all")
    truncate(cut)
    assert main(base_args(tiny_sd1_dir, data, tmp_path / "out"), prog="t", family="sd", description="t") == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        f"  WARNING: {folder}: 3 unreadable image(s) skipped (listed below); --strict_dataset makes this an error"
        in out
    )
    start = out.index("Skipped images (3):")
    assert out[start + 1 : start + 4] == [
        f"  {empty}: unreadable (empty file (0 bytes))",
        f"  {unknown}: unreadable (unknown or corrupt image format)",
        f"  {cut}: unreadable (image file is truncated)",
    ]
    assert (tmp_path / "out" / "e2e.safetensors").is_file()


LOADING = pytest.mark.parametrize(
    "loading",
    [
        ["--cache_latents"],  # found while caching latents, before training
        ["--max_data_loader_n_workers", "0"],  # found by the training loop itself
        ["--max_data_loader_n_workers", "1"],  # found in a DataLoader worker process
    ],
    ids=["cache_latents", "workers0", "workers1"],
)


@LOADING
def test_damaged_image_found_at_load_time_with_strict_dataset(
    loading: list[str], tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys
) -> None:
    """Header and end are intact, so the scan cannot tell; decoding fails after the weights are loaded. The
    error is still one line naming the file, and an existing final LoRA (--overwrite) is left as it was."""
    bad = data / "2_sks shape" / "img2.png"
    reason = damage(bad)
    final = tmp_path / "out" / "e2e.safetensors"
    final.parent.mkdir()
    final.write_bytes(EARLIER)
    # One batch of all 8 items (4 images x 2 repeats): the first batch is sure to meet the broken image.
    argv = base_args(
        tiny_sd1_dir,
        data,
        final.parent,
        "--train_batch_size",
        "8",
        "--overwrite",
        "--strict_dataset",
        *loading,
    )
    assert run_errors(argv, capsys) == [f"cannot read image {bad}: {reason}; fix or remove the file"]
    assert final.read_bytes() == EARLIER


@LOADING
def test_damaged_image_found_at_load_time_is_replaced(
    loading: list[str], tiny_sd1_dir: Path, data: Path, tmp_path: Path, caplog
) -> None:
    """Without --strict_dataset the batch takes another image of the bucket and training finishes."""
    bad = data / "2_sks shape" / "img2.png"
    reason = damage(bad)
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out", "--train_batch_size", "8", *loading)
    assert main(argv, prog="train_network.py", family="sd", description="t") == 0
    assert (tmp_path / "out" / "e2e.safetensors").is_file()
    if loading != ["--max_data_loader_n_workers", "1"]:  # a worker process logs where caplog cannot see
        (warning,) = [
            r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(bad) in r.getMessage()
        ]
        assert warning.startswith(f"cannot read image {bad}: {reason}")


# ----------------------------------------------------------------------------------- config files


def test_dataset_toml_type_error_and_unknown_keys(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    toml = tmp_path / "ds.toml"
    toml.write_text(
        "[general]\nresolution = 64\nshuffle_captions = true\n\n[[datasets]]\n\n  [[datasets.subsets]]\n"
        f'  image_dir = "{data / "2_sks shape"}"\n  num_repeats = "ten"\n  foo = 1\n'
    )
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out", "--dataset_config", str(toml))
    assert run_errors(argv, capsys) == [
        f'{toml}: general.shuffle_captions is not a known key (did you mean "shuffle_caption"?)',
        f'{toml}: datasets[0].subsets[0].num_repeats must be an integer, got "ten"',
        f"{toml}: datasets[0].subsets[0].foo is not a known key; remove it or fix its spelling",
    ]


def test_config_file_type_error(tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text('[training]\nmax_train_steps = "many"\nlearning_rat = 1e-4\n\n[other]\nfoo = 1\n')
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out", "--config_file", str(cfg))
    assert run_errors(argv, capsys) == [
        f"{cfg}: max_train_steps must be an integer, got 'many'",
        f"{cfg}: unknown option 'learning_rat' (did you mean \"learning_rate\"?)",
        f"{cfg}: unknown option 'foo'; remove it or fix its spelling (--help lists them)",
    ]


def test_network_args(tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights) -> None:
    argv = base_args(tiny_sd1_dir, data, tmp_path / "out", "--network_args", "conv_dim=abc", "foo=1")
    assert run_errors(argv, capsys) == [
        "--network_args conv_dim=abc: must be an integer >= 0",
        "--network_args foo: unknown for networks.lora; accepted: conv_dim, conv_alpha, dropout, rank_dropout, "
        "module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio, block_dims, "
        "block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight, "
        "block_lr_zero_threshold; FLUX.1 also: "
        "train_blocks, img_attn_dim, txt_attn_dim, img_mlp_dim, txt_mlp_dim, img_mod_dim, txt_mod_dim, "
        "single_dim, single_mod_dim, in_dims, train_double_block_indices, train_single_block_indices, "
        "train_t5xxl, split_qkv, verbose",
    ]


# -------------------------------------------------------------------------------- several at once


def test_every_command_line_problem_in_one_run(tmp_path: Path, capsys, no_weights) -> None:
    model, data, vae = tmp_path / "model", tmp_path / "img", tmp_path / "vae.safetensors"
    argv = base_args(model, data, tmp_path / "out", "--vae", str(vae), "--lr_scheduler", "cosin")
    argv += ["--train_batch_size", "0", "--network_args", "conv_dim=abc"]
    assert run_errors(argv, capsys) == [
        f"--pretrained_model_name_or_path: model {model} does not exist; pass a local diffusers folder or "
        ".safetensors/.ckpt file (hub ids are not downloaded)",
        f"--train_data_dir: folder {data} does not exist; check the path",
        f"--vae: path {vae} does not exist; check the path",
        "--train_batch_size must be positive, got 0",
        "--lr_scheduler: unknown scheduler 'cosin' (did you mean \"cosine\"?); use one of constant, "
        "constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt, "
        "cosine_with_min_lr, warmup_stable_decay, piecewise_constant, adafactor, or a class with "
        "--lr_scheduler_type",
        "--network_args conv_dim=abc: must be an integer >= 0",
    ]


def test_dataset_and_model_problems_in_one_run(
    tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, model)
    shutil.rmtree(model / "vae")
    data = make_dataset(tmp_path / "data")
    (data / "1_empty").mkdir()
    bad = data / "2_sks shape" / "img0.png"
    bad.write_bytes(b"")
    assert run_errors(base_args(model, data, tmp_path / "out", "--strict_dataset"), capsys) == [
        f"no images in {data / '1_empty'} (looked for .png .jpg .jpeg .webp .bmp; sub-folders are not "
        "searched); add images or remove this folder from the dataset",
        f"cannot read image {bad}: empty file (0 bytes); fix or remove the file",
        f"--pretrained_model_name_or_path: {model} is missing vae/config.json, "
        f"vae/diffusion_pytorch_model.safetensors; {FOLDER_CONTENTS}",
    ]


# ------------------------------------------------------------------------------------------ outputs


def test_existing_output_is_refused_without_overwrite(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "e2e.safetensors").write_bytes(EARLIER)
    assert run_errors(base_args(tiny_sd1_dir, data, out), capsys) == [
        f"--output_dir: {out} already has e2e.safetensors from an earlier run; pass --overwrite to replace them "
        "or choose another --output_name"
    ]
    assert (out / "e2e.safetensors").read_bytes() == EARLIER
    assert sorted(p.name for p in out.iterdir()) == ["e2e.safetensors"]


def test_failed_run_keeps_the_existing_final_file(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite and a failure after the first optimizer step: intermediate saves happen, the final file is
    only replaced at the very end, so the earlier run's file survives byte for byte."""
    import library.training.loop as loop

    calls = []

    def failing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("simulated data problem at step 2")
        return real_loss(*args, **kwargs)

    real_loss = loop.diffusion_loss
    monkeypatch.setattr(loop, "diffusion_loss", failing_loss)
    out = tmp_path / "out"
    out.mkdir()
    (out / "e2e.safetensors").write_bytes(EARLIER)
    argv = base_args(tiny_sd1_dir, data, out, "--overwrite", "--save_every_n_steps", "1", "--cache_latents")
    assert run_errors(argv, capsys) == ["simulated data problem at step 2"]
    assert (out / "e2e.safetensors").read_bytes() == EARLIER
    assert sorted(p.name for p in out.iterdir()) == ["e2e-step00000001.safetensors", "e2e.safetensors"]


# --------------------------------------------------------------------------------------- real process


def test_train_network_py_exits_2_with_only_the_error_lines(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "train_network.py"), "--pretrained_model_name_or_path"]
    cmd += ["runwayml/stable-diffusion-v1-5", "--train_data_dir", "img", "--resolution", "64"]
    cmd += ["--output_dir", "out", "--network_args", "conv_dim=abc"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: --pretrained_model_name_or_path: model runwayml/stable-diffusion-v1-5 does not exist; pass a "
        "local diffusers folder or .safetensors/.ckpt file (hub ids are not downloaded)",
        "error: --train_data_dir: folder img does not exist; check the path",
        "error: --network_args conv_dim=abc: must be an integer >= 0",
    ]
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()

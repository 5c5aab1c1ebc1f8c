"""Training features on the tiny models, in-process: schedules, optimizers, SD2, precision, accumulation,
saving cadence and formats, dataset TOML, disk latent cache, network options, config files, workers,
TensorBoard and seeds. Every run trains a few steps at 64x64 (well under a second each)."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import pytest
import toml
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import parse_config
from library.entry import main
from library.families import get_family
from library.families.tiny import TinySingleFile
from library.training.optim import create_optimizer, create_scheduler, lr_lambda_for, resolve_warmup
from library.training.run import prepare

ROOT = Path(__file__).resolve().parent.parent
COLORS = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (240, 200, 20)]
NAME = "feat"


# --- helpers -------------------------------------------------------------------------------------------


def make_images(root: Path, n: int, repeats: int = 2) -> Path:
    """`root/img/<repeats>_sks shape/` with n distinct 64x64 images and .caption files; returns root/img."""
    folder = root / "img" / f"{repeats}_sks shape"
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), COLORS[i % len(COLORS)])
        for x in range(8 * (i + 1), 8 * (i + 1) + 16):
            for y in range(16, 40):
                img.putpixel((x % 64, y), (255, 255, 255))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text(f"sks shape, {['red', 'green', 'blue', 'yellow'][i % 4]}")
    return root / "img"


def common_args(model: Path, out: Path, *extra: str) -> list[str]:
    """Everything but the dataset: tiny LoRA, fixed seed, no workers, batch 2."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--output_name",
        NAME,
        "--network_module",
        "networks.lora",
        "--network_dim",
        "4",
        "--network_alpha",
        "2",
        "--learning_rate",
        "1e-3",
        "--seed",
        "7",
        "--max_data_loader_n_workers",
        "0",
        "--train_batch_size",
        "2",
        *extra,
    ]


def db_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return common_args(model, out, "--train_data_dir", str(data), "--resolution", "64", *extra)


def run_main(argv: list[str]) -> int:
    return main(argv, prog="train_network.py", family="sd", description="test")


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def lora_names(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".", 1)[0] for k in state}


def up_weights(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix) and k.endswith(".lora_up.weight")}


@pytest.fixture
def data2(tmp_path: Path) -> Path:
    """2 images x 2 repeats = 4 items: 2 batches of 2 per epoch."""
    return make_images(tmp_path / "data", n=2)


# --- 1. learning-rate schedules --------------------------------------------------------------------------

# total 10 steps, warmup 2; multiplier of the base lr at 0-based optimizer step s (hand computed)
EXPECTED_MULTIPLIERS = {
    "constant": [1.0] * 11,
    "constant_with_warmup": [0.0, 0.5] + [1.0] * 9,
    "linear": [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0],
    "cosine": [
        0.0,
        0.5,
        1.0,
        0.5 * (1 + math.cos(math.pi / 8)),  # 0.9619397662556434
        0.5 * (1 + math.cos(math.pi / 4)),  # 0.8535533905932737
        0.5 * (1 + math.cos(3 * math.pi / 8)),  # 0.6913417161825449
        0.5,
        0.5 * (1 - math.cos(3 * math.pi / 8)),  # 0.3086582838174551
        0.5 * (1 - math.cos(math.pi / 4)),  # 0.1464466094067262
        0.5 * (1 - math.cos(math.pi / 8)),  # 0.0380602337443566
        0.0,
    ],
}


@pytest.mark.parametrize("name", list(EXPECTED_MULTIPLIERS))
def test_lr_lambda_multipliers(name: str):
    warmup = 0 if name == "constant" else 2
    fn = lr_lambda_for(name, warmup, 10)
    assert [fn(s) for s in range(11)] == pytest.approx(EXPECTED_MULTIPLIERS[name], abs=1e-12)


def _lr_sequence(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer, steps: int) -> list[float]:
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def _sgd(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize(
    ("name", "warmup", "total"),
    [
        ("constant", 0, 10),
        ("constant_with_warmup", 2, 10),
        ("linear", 2, 10),
        ("cosine", 2, 10),
        ("linear", 0, 7),
        ("cosine", 3, 13),
    ],
)
def test_create_scheduler_matches_diffusers(name: str, warmup: int, total: int):
    from diffusers.optimization import get_scheduler

    ours_opt = _sgd()
    ours = _lr_sequence(
        create_scheduler(name, ours_opt, warmup_steps=warmup, total_steps=total), ours_opt, total
    )
    ref_opt = _sgd()
    ref = _lr_sequence(
        get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total), ref_opt, total
    )
    assert ours == pytest.approx(ref, abs=1e-7)
    if (warmup, total) == (2, 10):
        assert ours == pytest.approx([0.1 * m for m in EXPECTED_MULTIPLIERS[name]], abs=1e-12)


def test_constant_scheduler_ignores_warmup_with_warning(caplog: pytest.LogCaptureFixture):
    opt = _sgd()
    with caplog.at_level(logging.WARNING):
        lrs = _lr_sequence(create_scheduler("constant", opt, warmup_steps=3, total_steps=5), opt, 5)
    assert lrs == [0.1] * 6
    assert "--lr_warmup_steps is ignored by the constant scheduler; use constant_with_warmup" in caplog.text


@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [(0.1, 50, 5), (0.25, 10, 2), (0.5, 3, 1), (0, 50, 0), (5, 50, 5), (5.0, 50, 5), (1, 50, 1)],
)
def test_resolve_warmup_ratio_semantics(value: float, total: int, expected: int):
    assert resolve_warmup(value, total) == expected


def test_warmup_ratio_recorded_in_metadata(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "4",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "0.5",
        "--cache_latents",
    )
    assert run_main(args) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert (md["ss_lr_scheduler"], md["ss_lr_warmup_steps"], md["ss_max_train_steps"]) == ("cosine", "2", "4")


# --- 2. optimizers ---------------------------------------------------------------------------------------


def test_adamw8bit_falls_back_to_adamw_on_cpu(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir, data2, out, "--max_train_steps", "2", "--optimizer_type", "AdamW8bit", "--cache_latents"
    )
    with caplog.at_level(logging.WARNING):
        assert run_main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings.count("AdamW8bit needs a CUDA GPU; using torch.optim.AdamW on cpu instead") == 1
    # the metadata records the optimizer that actually ran
    assert metadata(out / f"{NAME}.safetensors")["ss_optimizer"] == "torch.optim.AdamW"


def test_create_optimizer_fallback_is_plain_adamw():
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.5}]
    opt = create_optimizer("AdamW8bit", params, 1e-3, {"weight_decay": 0.0}, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.0


def test_sgd_class_path_with_args(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "2",
        "--optimizer_type",
        "torch.optim.SGD",
        "--optimizer_args",
        "momentum=0.9",
        "nesterov=True",
        "--learning_rate",
        "0.5",
        "--cache_latents",
    )
    assert run_main(args) == 0
    final = out / f"{NAME}.safetensors"
    assert metadata(final)["ss_optimizer"] == "torch.optim.SGD(momentum=0.9,nesterov=True)"
    ups = up_weights(load_file(str(final)), "lora_")
    assert ups and all(bool(w.abs().sum() > 0) for w in ups.values())


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def test_bad_optimizer_arg_is_one_line_before_weights_load(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    from library.families.sd import StableDiffusionFamily

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", no_weights)
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--max_train_steps", "1", "--optimizer_args", "foo=1")
    assert run_main(args) == 2
    (line,) = _error_lines(capsys)
    # The accepted list comes from the installed torch's signature, so only its stable part is pinned.
    assert line.startswith(
        "error: --optimizer_args: torch.optim.AdamW does not accept foo; it accepts betas, eps, "
    )
    assert "weight_decay" in line
    assert not (out / f"{NAME}.safetensors").exists()


@pytest.mark.parametrize(
    ("optimizer_type", "expected"),
    [
        (
            "nosuchpkg.optim.Fancy",
            "error: --optimizer_type: cannot import nosuchpkg.optim (No module named 'nosuchpkg'); "
            "install it with: pip install nosuchpkg",
        ),
        ("torch.optim.NoSuchOptimizer", "error: --optimizer_type: torch.optim has no class NoSuchOptimizer"),
    ],
)
def test_unimportable_optimizer_names_the_fix(
    tiny_sd1_dir: Path,
    data2: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    optimizer_type: str,
    expected: str,
):
    args = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--optimizer_type", optimizer_type)
    assert run_main(args) == 2
    assert _error_lines(capsys) == [expected]


# --- 3. SD 2.x -------------------------------------------------------------------------------------------


def test_sd2_single_file_v_parameterization(
    tiny_sd2_single_file: TinySingleFile, data2: Path, tmp_path: Path
):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd2_single_file.checkpoint,
        data2,
        out,
        "--tokenizer_path",
        str(tiny_sd2_single_file.tokenizer_dir),
        "--v2",
        "--v_parameterization",
        "--max_train_steps",
        "2",
        "--cache_latents",
    )
    assert run_main(args) == 0
    final = out / f"{NAME}.safetensors"
    md = metadata(final)
    assert md["ss_v2"] == "True"
    assert md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.prediction_type"] == "v"
    assert md["modelspec.resolution"] == "64x64"
    names = lora_names(load_file(str(final)))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names  # SD2: linear projection


def test_sd2_detected_without_v2_flag(tiny_sd2_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd2_dir, data2, out, "--max_train_steps", "1", "--cache_latents")) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert (md["ss_v2"], md["ss_base_model_version"]) == ("True", "sd_v2")
    assert md["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert md["modelspec.prediction_type"] == "epsilon"


# --- 4. mixed precision and memory -----------------------------------------------------------------------


def test_bf16_gradient_checkpointing_prepared_run_trains(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    from library.training.loop import train_loop

    out = tmp_path / "out"
    argv = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--max_train_steps",
        "2",
    )
    config = parse_config(argv, prog="train_network.py", description="test")
    run = prepare(config, get_family("sd"))
    assert run.bundle.unet.is_gradient_checkpointing
    te_flags = [
        m.gradient_checkpointing
        for m in run.bundle.text_encoders[0].modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    assert te_flags and all(te_flags)
    assert run.bundle.unet.training  # diffusers only checkpoints in train mode
    # a checkpointed transformer block starts twice per step: forward, then the recompute in backward
    # (a pre-hook: torch's checkpoint stops the recompute early, before forward hooks would run)
    calls: list[int] = []
    block = run.bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    assert next(run.bundle.unet.parameters()).dtype == torch.bfloat16
    before = {k: v.clone() for k, v in run.network.state_dict().items()}
    assert all(float(v.abs().sum()) == 0 for v in up_weights(before, "lora_").values())

    final = train_loop(run)

    assert final == out / f"{NAME}.safetensors"
    assert len(calls) == 2 * 2
    saved = load_file(str(final))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert saved.keys() == before.keys()
    # grads reached every LoRA module through the checkpointed blocks: every zero-initialised up moved
    for key, weight in up_weights(saved, "lora_").items():
        assert float(weight.abs().sum()) > 0, key
    md = metadata(final)
    assert (md["ss_mixed_precision"], md["ss_gradient_checkpointing"]) == ("bf16", "True")


def test_bf16_save_precision(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--save_precision",
        "bf16",
        "--max_train_steps",
        "1",
        "--cache_latents",
    )
    assert run_main(args) == 0
    saved = load_file(str(out / f"{NAME}.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # alpha included, as kohya


def test_fp16_on_cpu_falls_back_to_fp32(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--mixed_precision", "fp16", "--max_train_steps", "1")
    with caplog.at_level(logging.WARNING):
        assert run_main(args) == 0
    assert "--mixed_precision fp16 needs a CUDA GPU; training in float32 on CPU" in caplog.text
    final = out / f"{NAME}.safetensors"
    assert {v.dtype for v in load_file(str(final)).values()} == {torch.float32}
    assert metadata(final)["ss_mixed_precision"] == "no"  # what the run actually used


# --- 5. gradient accumulation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("images", "batches", "steps"), [(4, 4, 2), (3, 3, 2)])
def test_gradient_accumulation_step_count(
    tiny_sd1_dir: Path, tmp_path: Path, images: int, batches: int, steps: int
):
    data = make_images(tmp_path / "data", n=images)  # x2 repeats, batch 2 -> `images` batches
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir,
        data,
        out,
        "--gradient_accumulation_steps",
        "2",
        "--max_train_epochs",
        "1",
        "--cache_latents",
        "--logging_dir",
        str(logs),
    )
    assert run_main(args) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert md["ss_num_batches_per_epoch"] == str(batches)
    assert (md["ss_steps"], md["ss_max_train_steps"], md["ss_epoch"]) == (str(steps), str(steps), "1")
    assert md["ss_gradient_accumulation_steps"] == "2"
    assert [e.step for e in _tb_scalars(logs, "loss/current")] == list(range(1, steps + 1))


# --- 6. saving cadence, names and formats ----------------------------------------------------------------


def test_save_every_n_epochs_with_state(tiny_sd1_dir: Path, tmp_path: Path):
    data = make_images(tmp_path / "data", n=1)  # 2 items, batch 2: one step per epoch
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data,
        out,
        "--save_every_n_epochs",
        "1",
        "--max_train_epochs",
        "3",
        "--save_state",
        "--cache_latents",
    )
    assert run_main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        f"{NAME}-000001-state",
        f"{NAME}-000001.safetensors",
        f"{NAME}-000002-state",
        f"{NAME}-000002.safetensors",
        f"{NAME}-state",
        f"{NAME}.safetensors",
    ]
    for suffix, step in (("-000001", 1), ("-000002", 2), ("", 3)):
        md = metadata(out / f"{NAME}{suffix}.safetensors")
        assert (md["ss_steps"], md["ss_epoch"]) == (str(step), str(step))
        state = out / f"{NAME}{suffix}-state"
        assert sorted(p.name for p in state.iterdir()) == [
            "network.safetensors",
            "optimizer.pt",
            "rng.pt",
            "scheduler.pt",
            "train_state.json",
        ]
        progress = json.loads((state / "train_state.json").read_text())
        assert progress == {
            "global_step": step,
            "epoch": step,
            "batch_in_epoch": 0,
            "seed": 7,
            "max_train_steps": 3,
        }
        # the state's network is the LoRA saved at the same point
        lora = load_file(str(out / f"{NAME}{suffix}.safetensors"))
        net = load_file(str(state / "network.safetensors"))
        assert lora.keys() == net.keys()
        for key in lora:
            assert torch.equal(lora[key], net[key]), key


def test_save_every_n_steps_and_ckpt_format(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    runs = {}
    for fmt in ("safetensors", "ckpt"):
        out = tmp_path / fmt
        args = db_args(
            tiny_sd1_dir,
            data2,
            out,
            "--save_every_n_steps",
            "2",
            "--max_train_steps",
            "3",
            "--save_model_as",
            fmt,
            "--cache_latents",
        )
        assert run_main(args) == 0
        assert sorted(p.name for p in out.iterdir()) == [f"{NAME}-step00000002.{fmt}", f"{NAME}.{fmt}"]
        runs[fmt] = out
    for suffix in ("-step00000002", ""):
        st = load_file(str(runs["safetensors"] / f"{NAME}{suffix}.safetensors"))
        ck = torch.load(runs["ckpt"] / f"{NAME}{suffix}.ckpt", map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and ck.keys() == st.keys()
        for key in st:
            assert torch.equal(ck[key], st[key]), key
    assert metadata(runs["safetensors"] / f"{NAME}-step00000002.safetensors")["ss_steps"] == "2"


def test_default_names_without_output_name(tiny_sd1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    data = make_images(tmp_path / "data", n=1)  # one step per epoch
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data,
        out,
        "--max_train_epochs",
        "3",
        "--save_every_n_epochs",
        "2",
        "--save_every_n_steps",
        "1",
        "--save_state",
        "--cache_latents",
    )
    i = args.index("--output_name")
    del args[i : i + 2]
    assert run_main(args) == 0
    # kohya's defaults: "epoch" for epoch saves, "at" for step saves, "last" for the final save
    assert sorted(p.name for p in out.iterdir()) == [
        "at-step00000001-state",
        "at-step00000001.safetensors",
        "at-step00000002-state",
        "at-step00000002.safetensors",
        "epoch-000002-state",
        "epoch-000002.safetensors",
        "last-state",
        "last.safetensors",
    ]
    assert metadata(out / "epoch-000002.safetensors")["ss_output_name"] == "None"

    # an epoch file left from that run is an existing output of the same (unset) name
    for p in out.iterdir():
        if p.name != "epoch-000002.safetensors" and p.is_file():
            p.unlink()
    capsys.readouterr()
    assert run_main(args) == 2
    (line,) = _error_lines(capsys)
    assert "epoch-000002.safetensors" in line and "--overwrite" in line


def test_no_metadata_keeps_minimal_keys(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--no_metadata",
        "--max_train_steps",
        "1",
        "--network_args",
        "conv_dim=2",
        "--cache_latents",
    )
    assert run_main(args) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert sorted(md) == [
        "modelspec.architecture",
        "modelspec.date",
        "modelspec.implementation",
        "modelspec.implementation_version",
        "modelspec.prediction_type",
        "modelspec.resolution",
        "modelspec.sai_model_spec",
        "modelspec.title",
        "ss_base_model_version",
        "ss_network_alpha",
        "ss_network_args",
        "ss_network_dim",
        "ss_network_module",
        "ss_v2",
        "sshs_legacy_hash",
        "sshs_model_hash",
    ]
    assert md["ss_network_args"] == '{"conv_dim": "2"}'
    assert md["modelspec.title"] == NAME


# --- 7. dataset TOML -------------------------------------------------------------------------------------


def test_quickstart_dataset_toml(tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # the path as a user types it in the repository
    out = tmp_path / "out"
    args = common_args(
        tiny_sd1_dir, out, "--dataset_config", "dataset_configs/quickstart.toml", "--max_train_steps", "2"
    )
    assert run_main(args) == 0
    md = metadata(out / f"{NAME}.safetensors")
    (dataset,) = json.loads(md["ss_datasets"])
    (subset,) = dataset["subsets"]
    assert subset["num_repeats"] == 10
    assert subset["img_count"] == 8
    assert subset["image_dir"] == "10_sks shape"
    assert (subset["class_tokens"], subset["is_reg"]) == ("sks shape", False)
    assert dataset["batch_size_per_device"] == 2 and dataset["enable_bucket"] is True
    assert dataset["num_train_images"] == 80
    assert md["ss_num_train_images"] == "80"
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sks shape": {"n_repeats": 10, "img_count": 8}}
    assert md["ss_steps"] == "2"


# --- 8. latent cache on disk -----------------------------------------------------------------------------


def test_cache_latents_to_disk_written_then_reused(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    folder = data2 / "2_sks shape"
    caplog.set_level(logging.INFO)
    args = ["--max_train_steps", "1", "--cache_latents_to_disk"]
    assert run_main(db_args(tiny_sd1_dir, data2, tmp_path / "out1", *args)) == 0
    npz = sorted(p.name for p in folder.glob("*.npz"))
    assert npz == ["img0_0064x0064_sd.npz", "img1_0064x0064_sd.npz"]
    assert "latents: latent cache (disk): 2 encoded, 0 reused" in caplog.messages
    mtimes = {name: (folder / name).stat().st_mtime_ns for name in npz}

    caplog.clear()
    assert run_main(db_args(tiny_sd1_dir, data2, tmp_path / "out2", *args)) == 0
    assert "latents: latent cache (disk): 0 encoded, 2 reused" in caplog.messages
    assert {name: (folder / name).stat().st_mtime_ns for name in npz} == mtimes
    assert sorted(p.name for p in folder.glob("*.npz")) == npz
    assert metadata(tmp_path / "out2" / f"{NAME}.safetensors")["ss_cache_latents"] == "True"


# --- 9. network options ----------------------------------------------------------------------------------


def test_network_weights_continue_training(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    from library.training.loop import train_loop

    first = tmp_path / "first"
    assert run_main(db_args(tiny_sd1_dir, data2, first, "--max_train_steps", "2", "--cache_latents")) == 0
    start = load_file(str(first / f"{NAME}.safetensors"))

    argv = db_args(
        tiny_sd1_dir,
        data2,
        tmp_path / "second",
        "--max_train_steps",
        "2",
        "--cache_latents",
        "--network_weights",
        str(first / f"{NAME}.safetensors"),
    )
    run = prepare(parse_config(argv, prog="train_network.py", description="test"), get_family("sd"))
    loaded = run.network.state_dict()
    assert loaded.keys() == start.keys()
    for key in start:  # every tensor came from the file
        assert torch.equal(loaded[key].cpu(), start[key]), key
    final = load_file(str(train_loop(run)))
    assert final.keys() == start.keys()
    changed = [k for k in up_weights(start, "lora_") if not torch.equal(final[k], start[k])]
    assert changed == sorted(up_weights(start, "lora_"))


def test_network_weights_must_match(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    te_only = tmp_path / "te"
    args = ["--max_train_steps", "1", "--cache_latents"]
    assert run_main(db_args(tiny_sd1_dir, data2, te_only, *args, "--network_train_text_encoder_only")) == 0
    full = tmp_path / "full"
    weights = str(te_only / f"{NAME}.safetensors")
    assert run_main(db_args(tiny_sd1_dir, data2, full, *args, "--network_weights", weights)) == 2
    lines = _error_lines(capsys)
    assert lines[0].startswith(f"error: --network_weights {weights}: does not match this network (")
    assert lines[1].startswith("error: missing keys (")
    assert "lora_unet_" in lines[1]
    assert not (full / f"{NAME}.safetensors").exists()


@pytest.mark.parametrize(
    ("flag", "prefix", "modules"),
    [
        ("--network_train_text_encoder_only", "lora_te_", 3 * 6),  # 3 layers x q, k, v, out, fc1, fc2
        ("--network_train_unet_only", "lora_unet_", 4 * 12),  # 4 attentions x proj_in/out, 2x4 attn, 2 ff
    ],
)
def test_train_only_one_part(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, flag: str, prefix: str, modules: int
):
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd1_dir, data2, out, flag, "--max_train_steps", "1", "--cache_latents")) == 0
    state = load_file(str(out / f"{NAME}.safetensors"))
    assert all(k.startswith(prefix) for k in state)
    assert len(lora_names(state)) == modules and len(state) == 3 * modules
    assert all(float(w.abs().sum()) > 0 for w in up_weights(state, prefix).values())


def test_locon_network_args(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--network_dim",
        "8",
        "--network_args",
        "conv_dim=4",
        "conv_alpha=1",
        "--max_train_steps",
        "1",
        "--cache_latents",
    )
    assert run_main(args) == 0
    final = out / f"{NAME}.safetensors"
    state = load_file(str(final))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert float(state[f"{conv}.alpha"]) == 1.0
    for name in ("lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"):
        assert state[f"{name}.lora_down.weight"].shape[0] == 4
    # Linear layers inside the LoCon blocks keep the base rank and alpha
    emb = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"
    assert state[f"{emb}.lora_down.weight"].shape[0] == 8 and float(state[f"{emb}.alpha"]) == 2.0
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 8
    md = metadata(final)
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("8", "2.0")


def test_unet_lr_zero_trains_text_encoder_only(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--unet_lr",
        "0",
        "--max_train_steps",
        "2",
        "--cache_latents",
        "--logging_dir",
        str(logs),
    )
    assert run_main(args) == 0
    final = out / f"{NAME}.safetensors"
    state = load_file(str(final))
    unet_ups, te_ups = up_weights(state, "lora_unet_"), up_weights(state, "lora_te_")
    # As kohya: the UNet modules stay in the file (applied, frozen, still zero); only the TE group trains.
    assert unet_ups and all(float(w.abs().sum()) == 0 for w in unet_ups.values())
    assert te_ups and all(float(w.abs().sum()) > 0 for w in te_ups.values())
    assert metadata(final)["ss_unet_lr"] == "0.0"
    assert "lr/unet" not in _tb_tags(logs)
    assert [e.value for e in _tb_scalars(logs, "lr/textencoder")] == pytest.approx([1e-3, 1e-3])


# --- 10. config files ------------------------------------------------------------------------------------

CONFIG_TOML = """\
[model]
pretrained_model_name_or_path = "{model}"

[dataset]
train_data_dir = "{data}"
resolution = "64"
train_batch_size = 2
cache_latents = true
max_data_loader_n_workers = 0

[network]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2

[training]
max_train_steps = 2
seed = 7
learning_rate = 1e-3

[saving]
output_dir = "{out}"
output_name = "{name}"
"""

CONFIG_YAML = """\
model:
  pretrained_model_name_or_path: "{model}"
dataset:
  train_data_dir: "{data}"
  resolution: 64
  train_batch_size: 2
  cache_latents: true
  max_data_loader_n_workers: 0
network:
  network_dim: 4
  network_alpha: 2
training:
  max_train_steps: 2
  seed: 7
  learning_rate: 1e-3
saving:
  output_dir: "{out}"
  output_name: "{name}"
"""


@pytest.mark.parametrize(("suffix", "template"), [(".toml", CONFIG_TOML), (".yaml", CONFIG_YAML)])
def test_config_file_drives_a_run(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, suffix: str, template: str
):
    out = tmp_path / "out"
    config = tmp_path / f"train{suffix}"
    config.write_text(template.format(model=tiny_sd1_dir, data=data2, out=out, name=NAME))
    # the command line wins over the file
    assert run_main(["--config_file", str(config), "--max_train_steps", "3"]) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert (md["ss_steps"], md["ss_seed"], md["ss_learning_rate"]) == ("3", "7", "0.001")
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("4", "2.0")
    assert (md["ss_cache_latents"], md["ss_resolution"]) == ("True", "(64, 64)")


def test_output_config_then_rerun(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    config = tmp_path / "train.toml"
    out = tmp_path / "out"
    config.write_text(CONFIG_TOML.format(model=tiny_sd1_dir, data=data2, out=out, name=NAME))
    written = tmp_path / "resolved" / "out.toml"
    argv = ["--config_file", str(config), "--network_dim", "8", "--output_config", str(written)]
    assert run_main(argv) == 0
    assert f"wrote resolved options to {written}" in capsys.readouterr().out
    assert written.is_file()
    assert not out.exists()  # nothing trained, nothing written
    resolved = {k: v for section in toml.loads(written.read_text()).values() for k, v in section.items()}
    assert resolved["network_dim"] == 8 and resolved["max_train_steps"] == 2
    assert "output_config" not in resolved and "config_file" not in resolved

    # a second --output_config to the same path is refused instead of overwriting
    assert run_main(argv) == 2
    assert _error_lines(capsys) == [
        f"error: --output_config: {written} already exists; choose another path or delete it"
    ]

    assert run_main(["--config_file", str(written)]) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert (md["ss_network_dim"], md["ss_steps"], md["ss_seed"]) == ("8", "2", "7")


# --- 11. DataLoader workers ------------------------------------------------------------------------------


def test_dataloader_worker_gives_identical_lora(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    results = {}
    for workers in ("0", "1"):
        out = tmp_path / f"w{workers}"
        args = db_args(tiny_sd1_dir, data2, out, "--max_train_steps", "3")
        args[args.index("--max_data_loader_n_workers") + 1] = workers
        assert run_main(args) == 0
        results[workers] = load_file(str(out / f"{NAME}.safetensors"))
    assert results["0"].keys() == results["1"].keys()
    for key in results["0"]:
        assert torch.equal(results["0"][key], results["1"][key]), key


def test_dataset_pickles_for_workers(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    from library.data.dataset import EpochBatchDataset
    from library.training.loop import make_loader

    argv = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--max_train_steps", "1")
    argv[argv.index("--max_data_loader_n_workers") + 1] = "1"
    run = prepare(parse_config(argv, prog="train_network.py", description="test"), get_family("sd"))
    loader, _ = make_loader(run)
    assert loader.num_workers == min(1, max(0, torch.multiprocessing.cpu_count() - 1))
    original = EpochBatchDataset(run.dataset)
    copy = pickle.loads(pickle.dumps(original))
    a, b = original[(0, 1)], copy[(0, 1)]
    assert a.keys() == b.keys() and a["captions"] == b["captions"]
    assert torch.equal(a["images"], b["images"])


# --- 12. TensorBoard -------------------------------------------------------------------------------------


def _tb_accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [p for p in logdir.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def _tb_scalars(logdir: Path, tag: str) -> list:
    return _tb_accumulator(logdir).Scalars(tag)


def _tb_tags(logdir: Path) -> list[str]:
    return sorted(_tb_accumulator(logdir).Tags()["scalars"])


def test_tensorboard_scalars(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    logs = tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir,
        data2,
        tmp_path / "out",
        "--max_train_steps",
        "4",
        "--lr_scheduler",
        "linear",
        "--text_encoder_lr",
        "5e-4",
        "--cache_latents",
        "--logging_dir",
        str(logs),
        "--log_prefix",
        "feat-",
    )
    assert run_main(args) == 0
    (run_dir,) = list(logs.iterdir())
    assert run_dir.name.startswith("feat-") and len(run_dir.name) == len("feat-") + 14
    assert _tb_tags(logs) == ["loss/average", "loss/current", "lr/textencoder", "lr/unet"]
    current = _tb_scalars(logs, "loss/current")
    assert [e.step for e in current] == [1, 2, 3, 4]  # one point per optimizer step
    losses = [e.value for e in current]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    # moving average over the last epoch's steps (2 batches per epoch)
    window = [losses[0], *((a + b) / 2 for a, b in zip(losses, losses[1:], strict=False))]
    assert [e.value for e in _tb_scalars(logs, "loss/average")] == pytest.approx(window, rel=1e-6)
    # as kohya: the lr logged at step k is the scheduler's value after k steps (linear, total 4)
    unet = _tb_scalars(logs, "lr/unet")
    assert [e.step for e in unet] == [1, 2, 3, 4]
    assert [e.value for e in unet] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0], abs=1e-9)
    te = [e.value for e in _tb_scalars(logs, "lr/textencoder")]
    assert te == pytest.approx([3.75e-4, 2.5e-4, 1.25e-4, 0.0], abs=1e-9)


# --- 13. seed --------------------------------------------------------------------------------------------


def test_unset_seed_is_chosen_logged_and_recorded(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--max_train_steps", "1", "--cache_latents")
    i = args.index("--seed")
    del args[i : i + 2]
    caplog.set_level(logging.INFO)
    assert run_main(args) == 0
    seeds = [m.removeprefix("seed: ") for m in caplog.messages if m.startswith("seed: ")]
    assert len(seeds) == 1 and seeds[0].isdigit()
    assert 0 <= int(seeds[0]) < 2**31
    assert metadata(out / f"{NAME}.safetensors")["ss_seed"] == seeds[0]

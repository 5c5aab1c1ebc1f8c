"""Dataset TOML, disk latent cache, config files, DataLoader workers and TensorBoard logging."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import pytest
import toml
import torch
from safetensors.torch import load_file
from train_helpers import (
    NAME,
    ROOT,
    common_args,
    db_args,
    error_lines,
    metadata,
    run_main,
    tb_scalars,
    tb_tags,
)

from library.config import parse_config
from library.families import get_family
from library.training.run import prepare

# --- 7. dataset TOML -------------------------------------------------------------------------------------


def test_quickstart_dataset_toml(tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # the path as a user types it in the repository
    out = tmp_path / "out"
    args = common_args(
        tiny_sd1_dir, out, "--dataset_config", "dataset_configs/quickstart.toml", "--max_train_steps", "2"
    )
    args.append("--metadata_include_paths")  # kohya's folder names in the metadata
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
    assert error_lines(capsys) == [
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
    from library.data.loader import EpochBatchDataset
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
    assert tb_tags(logs) == [
        "loss/average",
        "loss/current",
        "loss/epoch",
        "loss/epoch_average",
        "lr/textencoder",
        "lr/unet",
    ]
    current = tb_scalars(logs, "loss/current")
    assert [e.step for e in current] == [1, 2, 3, 4]  # one point per optimizer step
    losses = [e.value for e in current]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    # moving average over the last epoch's steps (2 batches per epoch)
    window = [losses[0], *((a + b) / 2 for a, b in zip(losses, losses[1:], strict=False))]
    assert [e.value for e in tb_scalars(logs, "loss/average")] == pytest.approx(window, rel=1e-6)
    # as kohya: the lr logged at step k is the scheduler's value after k steps (linear, total 4)
    unet = tb_scalars(logs, "lr/unet")
    assert [e.step for e in unet] == [1, 2, 3, 4]
    assert [e.value for e in unet] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0], abs=1e-9)
    te = [e.value for e in tb_scalars(logs, "lr/textencoder")]
    assert te == pytest.approx([3.75e-4, 2.5e-4, 1.25e-4, 0.0], abs=1e-9)

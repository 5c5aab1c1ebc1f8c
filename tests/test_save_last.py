"""--save_last_n_*: kohya's windows by hand, then on real runs; modelspec extras; atomic saves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from train_helpers import NAME, db_args, error_lines, metadata, run_main, tb_accumulator, tb_scalars

from library.training.retention import epoch_to_remove, step_to_remove


def test_epoch_window_counts_saves() -> None:
    # every 2 epochs, keep 3 saves: after epoch 8 the save of epoch 8 - 2*3 = 2 goes.
    assert epoch_to_remove(8, every=2, last_n=3) == 2
    assert epoch_to_remove(6, every=2, last_n=3) is None  # 6 - 6 = 0: nothing saved at epoch 0
    assert epoch_to_remove(8, every=2, last_n=None) is None


def test_step_window_counts_steps() -> None:
    # every 10 steps, keep the last 20 steps: after 40, step 40 - 21 = 19 -> 10 goes (20, 30, 40 stay).
    assert step_to_remove(40, every=10, last_n=20) == 10
    assert step_to_remove(30, every=10, last_n=20) is None  # 9 -> 0
    assert step_to_remove(45, every=5, last_n=12) == 30  # 32 -> 30
    assert step_to_remove(40, every=None, last_n=20) is None


def test_save_last_n_epochs_and_states(tiny_sd1_dir: Path, data2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_epochs",
        "5",
        "--save_every_n_epochs",
        "1",
        "--save_last_n_epochs",
        "2",
        "--save_last_n_epochs_state",
        "1",
        "--save_state",
        "--cache_latents",
    )
    assert run_main(args) == 0
    # Epoch saves 1..4 (epoch 5 is the final file); 2 files and 1 state are kept, the final ones always.
    assert sorted(p.name for p in out.iterdir()) == [
        f"{NAME}-000003.safetensors",
        f"{NAME}-000004-state",
        f"{NAME}-000004.safetensors",
        f"{NAME}-state",
        f"{NAME}.safetensors",
    ]


def test_save_last_n_steps(tiny_sd1_dir: Path, data2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "8",
        "--save_every_n_steps",
        "2",
        "--save_last_n_steps",
        "3",
        "--save_state",
        "--cache_latents",
    )
    assert run_main(args) == 0
    # Saves at 2, 4, 6; after 6 the save at (6 - 3 - 1) rounded down to /2 = 2 goes, its state too.
    assert sorted(p.name for p in out.iterdir()) == [
        f"{NAME}-state",
        f"{NAME}-step00000004-state",
        f"{NAME}-step00000004.safetensors",
        f"{NAME}-step00000006-state",
        f"{NAME}-step00000006.safetensors",
        f"{NAME}.safetensors",
    ]


def test_modelspec_fields_land_in_the_file(tiny_sd1_dir: Path, data2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["--max_train_steps", "1", "--cache_latents", "--metadata_title", "My LoRA"]
    extra += ["--metadata_author", "me", "--metadata_description", "a test", "--metadata_license", "MIT"]
    extra += ["--metadata_tags", "a, b"]
    assert run_main(db_args(tiny_sd1_dir, data2, out, *extra)) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert md["modelspec.title"] == "My LoRA"
    assert md["modelspec.author"] == "me"
    assert md["modelspec.description"] == "a test"
    assert md["modelspec.license"] == "MIT"
    assert md["modelspec.tags"] == "a, b"


def test_crash_mid_save_keeps_the_previous_file(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--max_train_steps", "1", "--cache_latents")
    assert run_main(args) == 0
    final = out / f"{NAME}.safetensors"
    before = final.read_bytes()

    import networks.lora_file as lora_file

    real_fsync = lora_file.os.fsync

    def crash(fd: int) -> None:  # the bytes are half on disk when the "power fails"
        real_fsync(fd)
        raise OSError("disk full")

    monkeypatch.setattr(lora_file.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        run_main([*args, "--overwrite", "--max_train_steps", "2"])
    monkeypatch.undo()
    assert final.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [final.name]  # no temp file left behind


def test_epoch_loss_and_logged_config(tiny_sd1_dir: Path, data2: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    extra = ["--max_train_epochs", "2", "--cache_latents", "--logging_dir", str(logs), "--log_config"]
    assert run_main(db_args(tiny_sd1_dir, data2, tmp_path / "out", *extra, "--log_with", "tensorboard")) == 0
    current = [e.value for e in tb_scalars(logs, "loss/current")]
    epoch = tb_scalars(logs, "loss/epoch")
    # 2 steps per epoch; each epoch's value is the mean of its steps' losses.
    assert [e.step for e in epoch] == [2, 4]
    assert [e.value for e in epoch] == pytest.approx([sum(current[:2]) / 2, sum(current[2:]) / 2], rel=1e-5)
    text = tb_accumulator(logs).Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 0.001' in text and str(tmp_path) not in text


def test_loggable_options_drop_paths_and_secrets(tiny_sd1_dir: Path, data2: Path, tmp_path: Path) -> None:
    from library.config import loggable_options, parse_config

    args = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--logging_dir", str(tmp_path / "logs"))
    options = loggable_options(parse_config(args, prog="t", description="t"))
    assert options["network_dim"] == 4 and options["seed"] == 7
    for hidden in ("pretrained_model_name_or_path", "output_dir", "train_data_dir", "logging_dir", "vae"):
        assert hidden not in options


def test_log_with_needs_its_tracker(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_main(db_args(tiny_sd1_dir, data2, tmp_path / "out", "--log_with", "tensorboard")) == 2
    assert error_lines(capsys) == [
        "error: --log_with tensorboard needs --logging_dir (where TensorBoard logs go)"
    ]
    if importlib.util.find_spec("wandb") is None:
        assert run_main(db_args(tiny_sd1_dir, data2, tmp_path / "out", "--log_with", "wandb")) == 2
        assert error_lines(capsys) == [
            "error: --log_with wandb: the wandb package is not installed; pip install wandb"
        ]


def test_crash_mid_state_save_keeps_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import library.training.state as state_module
    from library.training.state import Progress, read_progress, save_state

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    folder = tmp_path / "lora-state"

    def save(step: int) -> None:
        save_state(
            folder,
            network_state={"w": param.detach() * step},
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=None,
            progress=Progress(global_step=step),
        )

    save(1)
    real_save = torch.save

    def crash(obj: object, f: object) -> None:
        if str(f).endswith("rng.pt"):  # after the weights and optimizer were written
            raise OSError("disk full")
        real_save(obj, f)

    monkeypatch.setattr(state_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(2)
    monkeypatch.undo()
    assert read_progress(folder)[0].global_step == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(folder / "network.safetensors"))["w"], torch.ones(2))

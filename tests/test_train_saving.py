"""Saving cadence, names, formats and metadata; network options (weights, LoCon, train subsets, lr 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    NAME,
    db_args,
    error_lines,
    lora_names,
    make_images,
    metadata,
    run_main,
    tb_scalars,
    tb_tags,
    up_weights,
)

from library.config import parse_config
from library.families import get_family
from library.training.run import prepare

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
            "family": "sd",
            "script": "train_network.py",
            "network_module": "networks.lora",
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
    (line,) = error_lines(capsys)
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
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: --network_weights {weights}: does not match this network (")
    assert "e.g. missing: lora_unet_" in lines[0]
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
    assert "lr/unet" not in tb_tags(logs)
    assert [e.value for e in tb_scalars(logs, "lr/textencoder")] == pytest.approx([1e-3, 1e-3])

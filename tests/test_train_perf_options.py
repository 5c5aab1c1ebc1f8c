"""--profile_steps (a Chrome trace of chosen steps) and --torch_compile (per block, with a fallback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import db_args, error_lines, make_images, run_main

from library.families import get_family
from library.training.compile import backend_failure


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def _steps_in_trace(path: Path) -> list[str]:
    events = json.loads(path.read_text())["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def test_profile_steps_writes_a_trace_of_those_steps(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, caplog
):
    out, logs = tmp_path / "out", tmp_path / "logs"
    with caplog.at_level("INFO"):
        assert (
            run_main(db_args(tiny_sd1_dir, dataset, out, "--max_train_steps", "4", "--profile_steps", "2-3"))
            == 0
        )
    trace = out / "profile" / "steps_2-3.json"
    assert _steps_in_trace(trace) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert f"profile of steps 2-3 written to {trace}" in caplog.text
    # with --logging_dir the trace goes there; a range reaching the last step is written at the end
    args = ["--max_train_steps", "2", "--profile_steps", "2", "--logging_dir", str(logs)]
    assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "out2", *args)) == 0
    assert _steps_in_trace(logs / "profile" / "steps_2-2.json") == ["ProfilerStep#2"]


def test_profile_steps_checked_up_front(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    for value, problem in [
        ("3-x", "expected A-B, two step numbers such as 10-12"),
        ("0-2", "steps count from 1"),
        ("4-2", "the first step (4) comes after the last (2)"),
        ("5-6", "the run has only 5 steps; profile steps within 1-5"),
    ]:
        assert (
            run_main(db_args(tiny_sd1_dir, dataset, out, "--max_train_steps", "5", "--profile_steps", value))
            == 2
        )
        assert error_lines(capsys) == [f"error: --profile_steps {value}: {problem}"]
    # with epochs the step count comes from the dataset scan: 8 items / batch 2 = 4 steps per epoch
    assert (
        run_main(db_args(tiny_sd1_dir, dataset, out, "--max_train_epochs", "2", "--profile_steps", "8-9"))
        == 2
    )
    assert (
        error_lines(capsys)[-1]
        == "error: --profile_steps 8-9: the run has only 8 steps; profile steps within 1-8"
    )
    assert not out.exists()


def test_torch_compile_options_checked_up_front(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys):
    args = ["--torch_compile", "--dynamo_backend", "inductr", "--blocks_to_swap", "2"]
    assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "out", *args)) == 2
    lines = error_lines(capsys)
    assert lines[0] == (
        "error: --torch_compile and --blocks_to_swap exclude each other (block swapping moves weights between "
        "the blocks' calls, which a compiled block cannot see); pick one"
    )
    assert lines[1].startswith(
        "error: --dynamo_backend inductr: not a torch.compile backend here; use one of "
    )
    assert "inductor" in lines[1].split("use one of ")[1].split(", ")


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C compiler found (test)")


def test_torch_compile_falls_back_with_one_message(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, caplog):
    import torch._dynamo

    torch._dynamo.register_backend(_failing_backend, name="loratrain_failing_test")
    common = ["--max_train_steps", "2", "--gradient_checkpointing"]
    assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "plain", *common)) == 0
    compile_args = ["--torch_compile", "--dynamo_backend", "loratrain_failing_test"]
    with caplog.at_level("INFO"):
        assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "c", *common, *compile_args)) == 0
    messages = [r.getMessage() for r in caplog.records if "--torch_compile" in r.getMessage()]
    assert messages == [
        "--torch_compile: the loratrain_failing_test backend does not work here (RuntimeError: no C compiler "
        "found (test)); training without compilation"
    ]
    plain, fallback = (load_file(str(tmp_path / d / "feat.safetensors")) for d in ("plain", "c"))
    assert all(torch.equal(plain[k], fallback[k]) for k in plain)


def test_compile_blocks_per_family(tiny_sd1_dir: Path, tiny_flux):
    class Bundle:
        unet = torch.nn.Module()

    unet = Bundle.unet
    unet.down_blocks, unet.up_blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1)] * 2), torch.nn.ModuleList()
    unet.mid_block = torch.nn.Identity()
    assert get_family("sd").compile_blocks(Bundle()) == [*unet.down_blocks, unet.mid_block]
    unet.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1)])
    unet.single_transformer_blocks = torch.nn.ModuleList([torch.nn.Tanh(), torch.nn.ReLU()])
    flux = get_family("flux").compile_blocks(Bundle())
    assert flux == [*unet.transformer_blocks, *unet.single_transformer_blocks]
    assert backend_failure("eager", torch.device("cpu")) is None


def test_torch_compile_trains_the_same_lora(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, caplog):
    # aot_eager traces forward and backward like inductor but generates no code: seconds, no C compiler
    common = ["--max_train_steps", "2", "--gradient_checkpointing"]
    assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "plain", *common)) == 0
    with caplog.at_level("INFO"):
        args = [*common, "--torch_compile", "--dynamo_backend", "aot_eager"]
        assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "c", *args)) == 0
    assert "--torch_compile: 5 blocks compiled with aot_eager" in caplog.text
    plain, compiled = (load_file(str(tmp_path / d / "feat.safetensors")) for d in ("plain", "c"))
    assert plain.keys() == compiled.keys()
    assert max((plain[k] - compiled[k]).abs().max().item() for k in plain) < 1e-5

"""SIGTERM / SIGINT during training: the step finishes, the LoRA and a resumable state are saved, the exit
status is 128 + the signal, and --resume from that state ends with the same LoRA as a run never stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, db_args, make_images, run_main

# A schedule that changes every step (warmup, then cosine), so a resume that restored the scheduler wrongly
# or counted steps differently would show in the weights.
SCHEDULE = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--cache_latents", "--max_train_steps", "8"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """train_network.py through tests/fault_runner.py, stdout and stderr merged, line by line."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fault_runner.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def wait_for(proc: subprocess.Popen, prefix: str, seen: list[str], timeout: float = 120) -> str:
    """Read output lines until one holds `prefix` (a progress bar may precede it); every line is kept in `seen`."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exited ({proc.wait()}) before {prefix!r}:\n" + "".join(seen[-40:]))
        seen.append(line)
        if prefix in line:
            return line
    proc.kill()
    raise AssertionError(f"no {prefix!r} within {timeout} s")


def finish(proc: subprocess.Popen, seen: list[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + out


def equal_files(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_sigterm_saves_a_state_that_resumes_bit_for_bit(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    straight = tmp_path / "straight"
    assert run_main(db_args(tiny_sd1_dir, dataset, straight, *SCHEDULE, name="e2e")) == 0
    # The handlers are the loop's only: the process's own come back after training.
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers

    out = tmp_path / "split"
    args = db_args(tiny_sd1_dir, dataset, out, *SCHEDULE, name="e2e")
    seen: list[str] = []
    proc = start(args, tmp_path, FAULT_STEP_SLEEP="0.5")
    wait_for(proc, "STEP-DONE 1", seen)
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc, seen)
    assert code == 143, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    match = re.fullmatch(
        r"error: stopped by SIGTERM after step (\d) of 8; saved (\S+) and the state (\S+): to continue, run the "
        r"same command with --resume (\S+)",
        errors[0],
    )
    assert match, errors[0]
    step = int(match[1])
    assert 1 <= step < 8
    lora, state = out / f"e2e-step{step:08d}.safetensors", out / f"e2e-step{step:08d}-state"
    assert (match[2], match[3], match[4]) == (str(lora), str(state), str(state))
    assert lora.is_file()
    recorded = json.loads((state / "train_state.json").read_text())
    assert recorded["global_step"] == step and recorded["max_train_steps"] == 8
    assert (recorded["family"], recorded["script"], recorded["network_module"]) == (
        "sd",
        "train_network.py",
        "networks.lora",
    )
    assert not (out / "e2e.safetensors").exists()  # the final LoRA belongs to a finished run

    assert run_main([*args, "--resume", str(state)]) == 0
    equal_files(straight / "e2e.safetensors", out / "e2e.safetensors")


def test_a_second_sigint_does_not_cut_the_save_short(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, dataset, out, *SCHEDULE, name="e2e")
    seen: list[str] = []
    # Each state file pauses 0.3 s once written, so the second Ctrl-C arrives while the state is being saved.
    proc = start(
        args, tmp_path, FAULT_STEP_SLEEP="0.5", FAULT_FSYNC_SLEEP="0.3", FAULT_FSYNC_MATCH="-state.tmp"
    )
    wait_for(proc, "STEP-DONE 1", seen)
    proc.send_signal(signal.SIGINT)
    wait_for(proc, "FSYNC ", seen)
    proc.send_signal(signal.SIGINT)
    code, output = finish(proc, seen)
    assert code == 130, output[-3000:]
    assert "SIGINT: still saving " in output and "not stopping halfway" in output
    (error,) = [line for line in output.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: stopped by SIGINT after step ")
    state = Path(error.rsplit("--resume ", 1)[1])
    assert sorted(p.name for p in state.iterdir()) == [
        "network.safetensors",
        "optimizer.pt",
        "rng.pt",
        "scheduler.pt",
        "train_state.json",
    ]
    assert not state.with_name(state.name + ".tmp").exists()


def test_sigterm_to_the_process_group_spares_the_data_loader_workers(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path
):
    """A scheduler's SIGTERM (or a terminal's Ctrl-C) reaches every process of the group; a worker that died
    of it would fail the batches the main process still needs to finish its step."""
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, dataset, out, "--max_train_steps", "8", "--max_data_loader_n_workers", "1")
    # Four micro-batches a step: more than the worker has prefetched when the signal comes.
    args += ["--persistent_data_loader_workers", "--gradient_accumulation_steps", "4", "--output_name", "e2e"]
    seen: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fault_runner.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "FAULT_STEP_SLEEP": "0.5"},
        start_new_session=True,  # its own process group, as a job under a terminal or a scheduler
    )
    wait_for(proc, "STEP-DONE 1", seen)
    os.killpg(proc.pid, signal.SIGTERM)
    code, output = finish(proc, seen)
    assert code == 143, output[-3000:]
    (error,) = [line for line in output.splitlines() if line.startswith("error: ")]
    state = Path(error.rsplit("--resume ", 1)[1])
    assert json.loads((state / "train_state.json").read_text())["global_step"] in (1, 2)


def launch_two(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of train_network.py via fault_runner."""
    import socket

    with socket.socket() as s:  # other runs on this machine may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(ROOT / "tests" / "fault_runner.py"), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
    )


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tiny_sd1_dir: Path, tmp_path: Path):
    data = make_images(tmp_path / "data", n=4, repeats=2)
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data, out, *SCHEDULE, "--train_batch_size", "1", name="e2e")
    seen: list[str] = []
    proc = launch_two(args, tmp_path, FAULT_STEP_SLEEP="0.5")
    line = wait_for(proc, "STEP-DONE 1 rank 1 ", seen)
    pid = int(re.search(r"STEP-DONE 1 rank 1 pid (\d+)", line)[1])  # type: ignore[index]
    os.kill(pid, signal.SIGTERM)  # rank 1 only: rank 0 learns it from rank 1
    code, output = finish(proc, seen)
    assert code != 0
    # Rank 0 tells, once, with rank 1's signal; the launcher reports the first rank to exit with its status.
    (error,) = [line[line.index("error: ") :] for line in output.splitlines() if "error: " in line]
    assert error.startswith("error: stopped by SIGTERM after step "), output[-4000:]
    assert re.search(r"exitcode\s*: 143 ", output), output[-4000:]
    state = Path(error.rsplit("--resume ", 1)[1])
    step = json.loads((state / "train_state.json").read_text())["global_step"]
    assert state.name == f"e2e-step{step:08d}-state" and 1 <= step < 8
    assert (out / f"e2e-step{step:08d}.safetensors").is_file()

"""Saves that survive faults: kill -9 in the middle of a save, a full disk, and --resume from a state that does
not belong to this run (another family, another network module, a crashed save's leftovers)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
from test_faults_signals import equal_files, finish, start, wait_for
from train_helpers import db_args, error_lines, flux_files_args, make_images, run_flux, run_main

from library.families.sd import StableDiffusionFamily

COMMON = ["--cache_latents", "--lr_scheduler", "constant", "--save_state"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def snapshot(*paths: Path) -> dict[str, bytes]:
    """Every file's bytes under `paths` (files or folders)."""
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*")))]
    return {str(p): p.read_bytes() for p in files}


def test_kill_9_mid_save_keeps_the_previous_lora_and_state(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd1_dir, dataset, out, "--max_train_steps", "2", *COMMON, name="e2e")) == 0
    lora, state = out / "e2e.safetensors", out / "e2e-state"
    before = snapshot(lora, state)
    resume = db_args(
        tiny_sd1_dir, dataset, out, "--max_train_steps", "4", *COMMON, "--resume", str(state), name="e2e"
    )

    # Killed with the new LoRA's bytes written and fsync'ed, before its rename.
    seen: list[str] = []
    proc = start(resume, tmp_path, FAULT_FSYNC_SLEEP="60", FAULT_FSYNC_MATCH="/.e2e.safetensors.")
    wait_for(proc, "FSYNC ", seen)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc, seen)[0] == -signal.SIGKILL
    assert snapshot(lora, state) == before
    assert len(list(out.glob(".e2e.safetensors.*.tmp"))) == 1  # the temp file a real crash leaves

    # Killed while the state's files are written: the LoRA is new, the previous state is untouched.
    seen = []
    proc = start(resume, tmp_path, FAULT_FSYNC_SLEEP="60", FAULT_FSYNC_MATCH="/e2e-state.tmp/")
    wait_for(proc, "FSYNC ", seen)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc, seen)[0] == -signal.SIGKILL
    assert snapshot(state) == {k: v for k, v in before.items() if k.startswith(str(state))}
    assert (out / "e2e-state.tmp").is_dir()
    assert not list(out.glob(".e2e.safetensors.*.tmp"))  # the next save of the LoRA removed the old temp

    # A crashed save's folder is never resumed from.
    leftover = out / "e2e-state.tmp"
    for name in ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "train_state.json"):
        (leftover / name).write_bytes((state / name).read_bytes())
    argv = db_args(
        tiny_sd1_dir, dataset, out, "--max_train_steps", "4", "--resume", str(leftover), name="e2e"
    )
    assert run_main(argv) == 2

    # The state that survived resumes to the same LoRA as a run never killed, and the leftovers are gone.
    assert run_main(resume) == 0
    assert sorted(p.name for p in out.iterdir()) == ["e2e-state", "e2e.safetensors"]
    straight = tmp_path / "straight"
    assert (
        run_main(db_args(tiny_sd1_dir, dataset, straight, "--max_train_steps", "4", *COMMON, name="e2e")) == 0
    )
    equal_files(straight / "e2e.safetensors", lora)


def test_resume_from_a_leftover_tmp_is_a_one_line_error(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys, no_weights
):
    leftover = tmp_path / "e2e-state.tmp"
    leftover.mkdir()
    for name in ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
        (leftover / name).write_bytes(b"x")
    (leftover / "train_state.json").write_text(json.dumps({"global_step": 1}))
    assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "out", "--resume", str(leftover))) == 2
    assert error_lines(capsys) == [
        f"error: --resume: {leftover} is the leftover of an interrupted save, not a finished state; resume from "
        f"{tmp_path / 'e2e-state'} instead"
    ]


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


def fail_fsync_of(monkeypatch: pytest.MonkeyPatch, match: str) -> None:
    """os.fsync raises ENOSPC for files whose path holds `match`: a disk that fills up during that save."""
    original = os.fsync

    def fsync(fd: int) -> None:
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(
    ("match", "culprit"),
    [
        ("/.e2e-step00000002.safetensors.", "e2e-step00000002.safetensors"),
        ("/e2e-step00000002-state.tmp/", "e2e-step00000002-state"),
    ],
    ids=["lora", "state"],
)
def test_disk_full_is_one_line_and_keeps_the_previous_save(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys, monkeypatch, match: str, culprit: str
):
    out = tmp_path / "out"
    fail_fsync_of(monkeypatch, match)
    argv = db_args(tiny_sd1_dir, dataset, out, "--max_train_steps", "3", "--save_every_n_steps", "1", *COMMON)
    assert run_main([*argv, "--output_name", "e2e"]) == 2
    (error,) = error_lines(capsys)
    assert re.fullmatch(
        rf"error: saving {re.escape(str(out / culprit))}: the disk is full \(needs about \d+\.\d MB, \d+\.\d MB "
        r"free\); the previous save is kept: free some space \(or pick another --output_dir\) and resume from "
        r"the last \*-state folder",
        error,
    ), error
    progress = json.loads((out / "e2e-step00000001-state" / "train_state.json").read_text())
    assert progress["global_step"] == 1
    names = sorted(p.name for p in out.iterdir())
    kept = ["e2e-step00000001-state", "e2e-step00000001.safetensors"]
    assert names == (kept if culprit.endswith(".safetensors") else [*kept, "e2e-step00000002.safetensors"])


def test_resume_with_another_network_module_is_a_one_line_error(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd1_dir, dataset, out, "--max_train_steps", "1", *COMMON, name="e2e")) == 0
    capsys.readouterr()
    monkeypatch.setattr(StableDiffusionFamily, "load", lambda *a, **k: pytest.fail("weights loaded"))
    state = out / "e2e-state"
    argv = db_args(
        tiny_sd1_dir, dataset, tmp_path / "b", "--resume", str(state), "--network_module", "networks.lora_fa"
    )
    assert run_main(argv) == 2
    assert error_lines(capsys) == [
        f"error: --resume: {state} was saved with --network_module networks.lora, not networks.lora_fa; pass "
        "--network_module networks.lora to resume it"
    ]


def test_resume_of_a_flux_state_by_train_network_is_a_one_line_error(
    tiny_flux, tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys
):
    out = tmp_path / "flux"
    args = db_args(tiny_flux.transformer, dataset, out, "--max_train_steps", "1", *COMMON, name="fx")
    args += flux_files_args(tiny_flux) + [
        "--network_module",
        "networks.lora_flux",
        "--t5xxl_max_token_length",
        "32",
    ]
    assert run_flux(args) == 0
    state = out / "fx-state"
    recorded = json.loads((state / "train_state.json").read_text())
    assert (recorded["family"], recorded["script"], recorded["network_module"]) == (
        "flux",
        "flux_train_network.py",
        "networks.lora_flux",
    )
    capsys.readouterr()
    assert run_main(db_args(tiny_sd1_dir, dataset, tmp_path / "sd", "--resume", str(state))) == 2
    assert error_lines(capsys) == [
        f"error: --resume: {state} is a state of flux_train_network.py (model family flux), which "
        "train_network.py cannot continue; resume it with flux_train_network.py"
    ]


def folder_with(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_folder_replaces_the_whole_folder(tmp_path: Path, monkeypatch, exchange: bool):
    from library.training import atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    folder = folder_with(tmp_path / "s-state", old="1", gone="x")
    with atomic.atomic_folder(folder) as tmp:
        assert tmp == tmp_path / "s-state.tmp" and not list(tmp.iterdir())
        (tmp / "new").write_text("2")
        assert contents(folder) == {"gone": "x", "old": "1"}  # untouched until the block ends
    assert contents(folder) == {"new": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-state"]


def test_atomic_folder_after_a_crash_between_the_two_renames(tmp_path: Path):
    """Without renameat2 a crash can fall between `folder -> folder.old` and `tmp -> folder`: the next save
    puts the previous state back first, so a failure of that save still leaves it in place."""
    from library.training import atomic

    folder = tmp_path / "s-state"
    folder_with(tmp_path / "s-state.old", old="1")
    folder_with(tmp_path / "s-state.tmp", half="?")
    with pytest.raises(OSError), atomic.atomic_folder(folder) as tmp:
        assert not list(tmp.iterdir())  # the crashed save's leftovers are gone
        raise OSError("the writer failed")
    assert contents(folder) == {"old": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-state"]

"""wandb wiring: run name, API key, kohya's --log_tracker_config, and the checks before weights load.

wandb itself is optional and not installed in CI, so a stand-in module records what the trainer asks of it;
what is tested is our wiring, not wandb.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from train_helpers import db_args, error_lines, make_images, run_main


class FakeRun:
    def __init__(self, calls: dict) -> None:
        self.calls = calls

    def log(self, values: dict, step: int) -> None:
        self.calls.setdefault("logged", []).append((step, sorted(values)))

    def finish(self) -> None:
        self.calls["finished"] = True


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> dict:
    calls: dict = {}
    module = types.ModuleType("wandb")
    module.__spec__ = types.SimpleNamespace(name="wandb")  # find_spec() sees an installed package
    module.login = lambda key: calls.__setitem__("login", key)

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun(calls)

    module.init = init
    module.Image = lambda image: image
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_name_key_and_tracker_config(tiny_sd1_dir: Path, tmp_path: Path, fake_wandb: dict):
    data = make_images(tmp_path / "data", n=2)
    tracker = tmp_path / "trackers.toml"
    tracker.write_text('[wandb]\nentity = "me"\ntags = ["lora"]\n')
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--max_train_steps", "2", "--log_with", "wandb",
                   "--log_tracker_name", "proj", "--wandb_run_name", "run1", "--wandb_api_key", "secret",
                   "--log_tracker_config", str(tracker))  # fmt: skip
    assert run_main(args) == 0
    init = fake_wandb["init"]
    assert (init["project"], init["name"], init["entity"], init["tags"]) == ("proj", "run1", "me", ["lora"])
    assert "api_key" not in init and fake_wandb["login"] == "secret"
    first_step, first_keys = fake_wandb["logged"][0]
    assert first_step == 1 and "loss/current" in first_keys
    assert fake_wandb["finished"] is True


def test_wandb_flags_checked_before_weights(
    tiny_sd1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    data = make_images(tmp_path / "data", n=2)
    bad = tmp_path / "bad.toml"
    bad.write_text("[wandb\n")
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--wandb_run_name", "x", "--log_tracker_config",
                   str(bad))  # fmt: skip
    assert run_main(args) == 2
    lines = error_lines(capsys)
    assert lines[0].startswith(f"error: --log_tracker_config: {bad} is not valid TOML: ")
    assert (
        lines[1]
        == "error: --wandb_run_name needs --log_with wandb (or all); add it or remove --wandb_run_name"
    )

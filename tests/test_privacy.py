"""Privacy and network: a LoRA carries no paths or folder names of the user's machine unless asked
(--metadata_include_paths), --no_metadata keeps only what loaders read, and a local run opens no socket."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from train_helpers import make_images, metadata, run_main

from library.training.metadata import MINIMAL_KEYS
from tools import check_lora, show_metadata

# Names no metadata value may contain unless --metadata_include_paths: every part of the dataset's and the
# model's paths that the user chose (the tmp folder of the test stands for the user's home).
SECRET_ROOT = "alice_private_q7x"
SECRET_MODEL = "alices-model-k2p"


@pytest.fixture
def setup(tmp_path: Path, tiny_sd1_dir: Path) -> tuple[Path, Path, Path]:
    home = tmp_path / SECRET_ROOT
    data = make_images(home / "photos", n=2)  # <home>/photos/img/2_sks shape
    model = home / SECRET_MODEL
    shutil.copytree(tiny_sd1_dir, model)
    return home, data, model


def train(model: Path, data: Path, out: Path, logs: Path, *extra: str) -> dict[str, str]:
    argv = [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
        "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4", "--seed", "1",
        "--max_train_steps", "1", "--max_data_loader_n_workers", "0", "--logging_dir", str(logs),
        "--vae", str(model / "vae"), *extra,
    ]  # fmt: skip
    assert run_main(argv) == 0
    return metadata(out / "lora.safetensors")


def leaks(md: dict[str, str], *needles: str) -> list[str]:
    return [f"{key}={value}" for key, value in md.items() for n in needles if n in value]


def test_metadata_names_no_folder_by_default(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    home, data, model = setup
    md = train(model, data, home / "out", home / "tb_logs")
    assert leaks(md, str(tmp_path), SECRET_ROOT, SECRET_MODEL, "2_sks shape", "photos", "tb_logs") == []
    assert "ss_sd_model_name" not in md and "ss_vae_name" not in md
    # kohya's JSON shapes and counts stay, under neutral names
    assert json.loads(md["ss_dataset_dirs"]) == {"subset_0": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {}
    assert json.loads(md["ss_tag_frequency"]) == {"subset_0": {"sks shape": 2, "red": 1, "green": 1}}
    assert md["ss_output_name"] == "lora" and md["modelspec.title"] == "lora"  # the LoRA's own name stays


def test_dataset_config_folders_are_neutral(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    home, data, model = setup
    sub = data / "2_sks shape"
    toml = home / "alice_dataset.toml"
    toml.write_text(
        "[general]\nresolution = 64\n\n[[datasets]]\nbatch_size = 1\n\n  [[datasets.subsets]]\n"
        f'  image_dir = "{sub}"\n  num_repeats = 3\n  class_tokens = "sks shape"\n\n'
        f'[[datasets]]\nbatch_size = 1\n\n  [[datasets.subsets]]\n  image_dir = "{sub}"\n  num_repeats = 1\n'
    )
    argv = ["--dataset_config", str(toml), "--train_data_dir", str(data)]
    md = train(model, data, home / "out", home / "tb_logs", *argv[:2])
    needles = (str(tmp_path), SECRET_ROOT, SECRET_MODEL, "2_sks shape", "alice_dataset")
    assert leaks(md, *needles) == []
    # the same folder twice: kohya's " (2)" suffix, on the neutral name
    assert json.loads(md["ss_dataset_dirs"]) == {
        "subset_0": {"n_repeats": 3, "img_count": 2},
        "subset_0 (2)": {"n_repeats": 1, "img_count": 2},
    }
    dataset, _ = json.loads(md["ss_datasets"])
    assert [s["image_dir"] for s in dataset["subsets"]] == ["subset_0"]
    assert list(dataset["tag_frequency"]) == ["subset_0"]


def test_metadata_include_paths_writes_kohyas_names(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    home, data, model = setup
    md = train(model, data, home / "out", home / "tb_logs", "--metadata_include_paths")
    assert json.loads(md["ss_dataset_dirs"]) == {"2_sks shape": {"n_repeats": 2, "img_count": 2}}
    assert list(json.loads(md["ss_tag_frequency"])) == ["2_sks shape"]
    assert md["ss_sd_model_name"] == SECRET_MODEL and md["ss_vae_name"] == "vae"
    assert leaks(md, str(tmp_path), SECRET_ROOT, "photos", "tb_logs") == []  # names only, never paths


def test_no_metadata_keeps_what_loaders_read(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, data, model = setup
    md = train(model, data, home / "out", home / "tb_logs", "--no_metadata")
    assert leaks(md, str(tmp_path), SECRET_ROOT, SECRET_MODEL, "2_sks shape") == []
    ss_keys = {k for k in md if not k.startswith("modelspec.")}
    # kohya's minimum (no network_args given) and the file hashes A1111 identifies LoRAs by
    assert ss_keys == set(MINIMAL_KEYS) - {"ss_network_args"} | {"sshs_model_hash", "sshs_legacy_hash"}
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    capsys.readouterr()
    # this repo's readers still identify and check the file
    assert check_lora.main([str(home / "out" / "lora.safetensors"), "--summary"]) == 0
    assert "SD 1.x" in capsys.readouterr().out
    assert show_metadata.main(["--model", str(home / "out" / "lora.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["ss_network_module"] == "networks.lora"


# ---------------------------------------------------------------------------------------------- network


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way out of the machine raises (and is recorded); local socketpairs still work."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise OSError("network access during a local training run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_local_training_opens_no_connection(
    no_sockets: list[str], tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quickstart-like run (diffusers folder, captions, sampling off) with the hub allowed: nothing may
    try the network, not even a reachability probe."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data = make_images(tmp_path / "data", n=2)
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(data),
        "--resolution", "64", "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4",
        "--max_train_steps", "2", "--max_data_loader_n_workers", "0", "--cache_latents",
        "--logging_dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert run_main(argv) == 0
    assert (out / "lora.safetensors").is_file()
    assert no_sockets == []


def test_single_file_without_tokenizer_respects_hf_hub_offline(
    no_sockets: list[str], tiny_sd1_single_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A single file carries no tokenizer; with HF_HUB_OFFLINE=1 and an empty hub cache the run stops with the
    flags that fix it instead of reaching for the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    data = make_images(tmp_path / "data", n=2)
    argv = [
        "--pretrained_model_name_or_path", str(tiny_sd1_single_file.checkpoint), "--train_data_dir",
        str(data), "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
    ]  # fmt: skip
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "--tokenizer_path" in line
    assert no_sockets == []
    assert not (tmp_path / "out").exists()


def test_tokenizer_from_the_hub_cache_needs_no_connection(
    no_sockets: list[str], tiny_sd1_single_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kohya's fallback for a single file: the tokenizer of the hub repo. Already in the Hugging Face cache,
    it is read from disk; transformers' local_files_only lookup would still reach for the hub."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo_cache = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    shutil.copytree(tiny_sd1_single_file.tokenizer_dir, repo_cache / "snapshots" / "0123abcd")
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = make_images(tmp_path / "data", n=2)
    argv = [
        "--pretrained_model_name_or_path", str(tiny_sd1_single_file.checkpoint), "--train_data_dir",
        str(data), "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
        "--max_data_loader_n_workers", "0", "--network_dim", "4",
    ]  # fmt: skip
    assert run_main(argv) == 0
    assert no_sockets == []

"""The bad-input catalogue (issue 9): each bad input through the real entry point ends with one error line
naming the file/key/flag and the fix, exit code 2, no traceback, and the existing output folder untouched
(every file's bytes and mtime; nothing added). test_bad_input.py holds the first part of the catalogue.

Every run passes --overwrite next to an earlier run's files, so only the bad input can be what stops it. Cases
knowable without weights run under `no_weights` (every family's `load` raises), which proves they stop first.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import save_file
from test_bad_input import base_args, make_dataset

from library.data.images import MAX_IMAGE_PIXELS
from library.entry import main
from library.families.flux import FluxFamily
from library.families.sd import StableDiffusionFamily
from library.families.sdxl import StableDiffusionXLFamily

ROOT = Path(__file__).resolve().parent.parent
EARLIER = b"LoRA bytes of an earlier run"
SCRIPTS = {"sd": "train_network.py", "sdxl": "sdxl_train_network.py", "flux": "flux_train_network.py"}
UNKNOWN = "is not a known key; remove it or fix its spelling"


# ------------------------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture
def out(tmp_path: Path):
    """An output folder holding an earlier run's LoRA and state file; checked untouched after the test."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "e2e.safetensors").write_bytes(EARLIER)
    (folder / "e2e-step00000001.safetensors").write_bytes(EARLIER + b" (step 1)")
    os.utime(folder / "e2e.safetensors", ns=(1_000_000_000, 1_000_000_000))  # an mtime a rewrite would change
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    for family in (StableDiffusionFamily, StableDiffusionXLFamily, FluxFamily):
        monkeypatch.setattr(family, "load", load)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def errors(argv: list[str], capsys: pytest.CaptureFixture[str], family: str = "sd") -> list[str]:
    """Run a script's entry point in process with --overwrite; assert exit 2 and no traceback; the error lines."""
    rc = main([*argv, "--overwrite"], prog=SCRIPTS[family], family=family, description="t")
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    return [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]


def png_header(path: Path, width: int, height: int) -> None:
    """A valid PNG that claims width x height but holds a few bytes of pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


class RunsCode:
    """Unpickling this calls os.system: what a malicious .ckpt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def lora_file(path: Path, names: list[str]) -> Path:
    """A LoRA file with the given module names (rank 2), enough for anything reading names and shapes."""
    state = {}
    for name in names:
        state[f"{name}.lora_down.weight"] = torch.zeros(2, 8)
        state[f"{name}.lora_up.weight"] = torch.zeros(8, 2)
        state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


SDXL_NAMES = ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_4_1_proj_in"]
FLUX_NAMES = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"]


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("pil_limit", ["pil default", "pil limit off"])
def test_decompression_bomb_is_refused_without_decoding(
    pil_limit: str, tiny_sd1_dir: Path, data: Path, out: Path, capsys, no_weights, monkeypatch
) -> None:
    """A 30000x30000 PNG header: refused from its header (PIL's guard, or ours where some library turned
    PIL's off), never decoded, and the message says what to do."""
    if pil_limit == "pil limit off":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    bomb = data / "2_sks shape" / "img0.png"
    png_header(bomb, 30000, 30000)
    size = "30000x30000 = 900,000,000" if pil_limit == "pil limit off" else "900,000,000"
    assert errors(base_args(tiny_sd1_dir, data, out, "--strict_dataset"), capsys) == [
        f"cannot read image {bomb}: {size} pixels is over the limit of 178,956,970 (a guard against "
        "decompression bombs); resize it (e.g. to 4096 pixels on its long side) or remove it"
    ]
    assert all(w * h <= MAX_IMAGE_PIXELS for w, h in decoded)


def test_caption_that_is_not_utf8(tiny_sd1_dir: Path, data: Path, out: Path, capsys, no_weights) -> None:
    caption = data / "2_sks shape" / "img1.caption"
    caption.write_bytes("sks shape, caf\u00e9".encode("latin-1"))
    assert errors(base_args(tiny_sd1_dir, data, out), capsys) == [
        f"caption file {caption} is not UTF-8 (byte 14); re-save it as UTF-8"
    ]


# ---------------------------------------------------------------------------------------- config files


def test_dataset_toml_syntax_error_has_line_and_column(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nresolution = 64\n\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "x\n')
    argv = base_args(tiny_sd1_dir, data, out, "--dataset_config", str(toml))
    assert errors(argv, capsys) == [
        f"{toml}:6: TOML syntax error: Illegal character '\\n' (column 17); fix the syntax on that line"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "max_train_steps = 3\nlearning_rate = = 1\n",
            ':2: TOML syntax error: Invalid value (column 17); values must be "quoted strings", numbers, '
            "true/false or [lists]",
        ),
        ("[training\nmax_train_steps = 3\n", ":1: TOML syntax error: Expected ']' at the end of a table "
         "declaration (column 10); fix the syntax on that line"),
    ],
    ids=["value", "table"],
)  # fmt: skip
def test_config_file_syntax_error_has_line_and_column(
    text: str, expected: str, tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text(text)
    argv = base_args(tiny_sd1_dir, data, out, "--config_file", str(cfg))
    assert errors(argv, capsys) == [f"{cfg}{expected}"]


def test_config_file_that_is_not_utf8(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_bytes('training_comment = "caf\u00e9"\n'.encode("latin-1"))
    argv = base_args(tiny_sd1_dir, data, out, "--config_file", str(cfg))
    assert errors(argv, capsys) == [f"--config_file: {cfg} is not UTF-8 (byte 23); re-save it as UTF-8"]


@pytest.mark.parametrize(
    ("level", "toml", "key"),
    [
        ("top", 'foo = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{sub}"\n', "foo"),
        ("general", '[general]\nfoo = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{sub}"\n',
         "general.foo"),
        ("datasets", '[[datasets]]\nfoo = 1\n[[datasets.subsets]]\nimage_dir = "{sub}"\n', "datasets[0].foo"),
        ("subsets", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{sub}"\nfoo = 1\n',
         "datasets[0].subsets[0].foo"),
    ],
    ids=lambda v: v if v in ("top", "general", "datasets", "subsets") else "",
)  # fmt: skip
def test_dataset_toml_unknown_key_at_each_level(
    level: str, toml: str, key: str, tiny_sd1_dir: Path, data: Path, out: Path, tmp_path, capsys, no_weights
) -> None:
    path = tmp_path / "ds.toml"
    path.write_text(toml.format(sub=data / "2_sks shape"))
    argv = base_args(tiny_sd1_dir, data, out, "--dataset_config", str(path))
    assert errors(argv, capsys) == [f"{path}: {key} {UNKNOWN}"]


def test_config_file_unknown_keys_top_and_nested(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text("network_dimm = 8\n\n[model]\nnetwork_alpa = 2\n")
    argv = base_args(tiny_sd1_dir, data, out, "--config_file", str(cfg))
    assert errors(argv, capsys) == [
        f"{cfg}: unknown option 'network_dimm' (did you mean \"network_dim\"?)",
        f"{cfg}: unknown option 'network_alpa' (did you mean \"network_alpha\"?)",
    ]


def test_dataset_toml_wrong_types_at_each_level(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    path = tmp_path / "ds.toml"
    path.write_text(
        '[general]\nresolution = "big"\nflip_aug = "yes"\n[[datasets]]\nbatch_size = 1.5\n'
        "[[datasets.subsets]]\nimage_dir = 3\n"
    )
    argv = base_args(tiny_sd1_dir, data, out, "--dataset_config", str(path))
    assert errors(argv, capsys) == [
        f'{path}: general.resolution must be a positive integer or [width, height], got "big"',
        f'{path}: general.flip_aug must be true or false, got "yes"',
        f"{path}: datasets[0].batch_size must be an integer, got 1.5",
        f"{path}: datasets[0].subsets[0].image_dir must be a string, got 3",
    ]


def test_wrong_types_on_the_command_line_and_in_a_config_file(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    argv = base_args(tiny_sd1_dir, data, out, "--network_dim", "four")
    assert errors(argv, capsys) == ["command line: --network_dim must be an integer, got 'four'"]
    argv = base_args(tiny_sd1_dir, data, out, "--learning_rate", "fast")
    assert errors(argv, capsys) == ["command line: --learning_rate must be a number, got 'fast'"]
    cfg = tmp_path / "train.toml"
    cfg.write_text('cache_latents = 3\nnetwork_alpha = "high"\n')
    argv = base_args(tiny_sd1_dir, data, out, "--config_file", str(cfg))
    assert errors(argv, capsys) == [
        f"{cfg}: cache_latents must be true or false, got 3",
        f"{cfg}: network_alpha must be a number, got 'high'",
    ]


# ---------------------------------------------------------------------------------------------- models


def test_model_folder_missing_its_text_encoder(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, model)
    shutil.rmtree(model / "text_encoder")
    (error,) = errors(base_args(model, data, out), capsys)
    assert error.startswith(
        f"--pretrained_model_name_or_path: {model} is missing text_encoder/config.json, "
        "text_encoder/model.safetensors; a diffusers SD folder holds"
    )


@pytest.mark.parametrize(
    ("model", "family", "says"),
    [
        ("sdxl_dir", "sd", "is an SDXL checkpoint; use sdxl_train_network.py"),
        ("sdxl_file", "sd", "is an SDXL checkpoint; use sdxl_train_network.py"),
        ("flux_dir", "sd", "is a transformer-based model (FLUX?); use flux_train_network.py for FLUX"),
        ("flux_file", "sd", "is a FLUX checkpoint; use flux_train_network.py"),
        ("sd1_dir", "sdxl", "is an SD 1.x/2.x model folder; use train_network.py"),
        ("sd1_dir", "flux", "has no transformer/ folder, so it is not FLUX.1; use train_network.py"),
        ("sd1_file", "flux", "is an SD 1.x/2.x checkpoint; use train_network.py"),
        ("sdxl_dir", "flux", "has no transformer/ folder, so it is not FLUX.1; use sdxl_train_network.py"),
    ],
)
def test_model_of_another_family(
    model: str, family: str, says: str, request, data: Path, out: Path, capsys, no_weights
) -> None:
    paths = {
        "sd1_dir": lambda: request.getfixturevalue("tiny_sd1_dir"),
        "sd1_file": lambda: request.getfixturevalue("tiny_sd1_single_file").checkpoint,
        "sdxl_dir": lambda: request.getfixturevalue("tiny_sdxl_dir"),
        "sdxl_file": lambda: request.getfixturevalue("tiny_sdxl_single_file").checkpoint,
        "flux_dir": lambda: request.getfixturevalue("tiny_flux").diffusers_dir,
        "flux_file": lambda: request.getfixturevalue("tiny_flux").transformer,
    }
    path = paths[model]()
    argv = base_args(path, data, out)
    assert errors(argv, capsys, family) == [f"--pretrained_model_name_or_path: {path} {says}"]


@pytest.mark.parametrize("pickle_format", ["zip", "legacy"])
@pytest.mark.parametrize("flag", ["--pretrained_model_name_or_path", "--vae", "--network_weights"])
def test_ckpt_whose_pickle_would_run_code(
    flag: str, pickle_format: str, tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys
) -> None:
    """Loaded with weights_only=True: refused, the code never runs, and the message says what to do."""
    marker = tmp_path / "code ran"
    evil = tmp_path / "model.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}
    torch.save(payload, evil, _use_new_zipfile_serialization=pickle_format == "zip")
    argv = base_args(evil if flag == "--pretrained_model_name_or_path" else tiny_sd1_dir, data, out)
    if flag != "--pretrained_model_name_or_path":
        argv += [flag, str(evil)]
    where = f"{flag} {evil}:" if flag == "--network_weights" else f"{flag}: {evil} is"
    assert errors(argv, capsys) == [
        f"{where} not a plain weights pickle (loading it would call posix.system; refused, as it could run "
        "code): convert it to .safetensors with a tool you trust, or get the .safetensors version"
    ]
    assert not marker.exists()


# ----------------------------------------------------------------------------- LoRA inputs and resume


@pytest.mark.parametrize(
    ("names", "family", "label", "script"),
    [
        (SDXL_NAMES, "sd", "SDXL", "sdxl_train_network.py"),
        (FLUX_NAMES, "sd", "FLUX.1", "flux_train_network.py"),
        (["lora_te_text_model_encoder_layers_0_mlp_fc1"], "sdxl", "SD 1.x/2.x", "train_network.py"),
    ],
    ids=["sdxl-to-sd", "flux-to-sd", "sd-to-sdxl"],
)
def test_network_weights_for_another_family(
    names, family: str, label: str, script: str, request, data: Path, out: Path, tmp_path, capsys, no_weights
) -> None:
    """Told from the file's module names before any weights load."""
    model = request.getfixturevalue("tiny_sdxl_dir" if family == "sdxl" else "tiny_sd1_dir")
    lora = lora_file(tmp_path / "other.safetensors", names)
    this = "SDXL" if family == "sdxl" else "SD 1.x/2.x"
    argv = base_args(model, data, out, "--network_weights", str(lora))
    assert errors(argv, capsys, family) == [
        f"--network_weights {lora}: a LoRA for {label} (modules like {names[0]}), but {SCRIPTS[family]} trains "
        f"{this}; pass a LoRA made for this model family, or train with {script}"
    ]


def test_network_weights_of_another_shape(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys
) -> None:
    """Same family, another --network_dim: found once the network is built, in one line with an example."""
    other = tmp_path / "dim8"
    argv = base_args(tiny_sd1_dir, data, other, "--max_train_steps", "1", "--network_dim", "8")
    assert main(argv, prog="train_network.py", family="sd", description="t") == 0
    weights = other / "e2e.safetensors"
    lines = errors(base_args(tiny_sd1_dir, data, out, "--network_weights", str(weights)), capsys)
    example = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight: file [8, 64] vs network [4, 64]"
    assert lines == [
        f"--network_weights {weights}: does not match this network (0 missing, 0 unexpected, 132 wrong shape; "
        f"e.g. wrong shape: {example}); use a LoRA made for this model with the same network_dim/conv_dim, or add "
        "--dim_from_weights to take the shapes from the file"
    ]


def test_network_weights_that_are_not_a_lora(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys
) -> None:
    junk = tmp_path / "lora.safetensors"
    junk.write_bytes(b"<html>404 Not Found</html>")
    (error,) = errors(base_args(tiny_sd1_dir, data, out, "--network_weights", str(junk)), capsys)
    assert error.startswith(f"--network_weights {junk}: cannot read the file (")
    assert error.endswith("it may be truncated or not a LoRA file: save or download it again")


def fake_state(folder: Path, names: list[str]) -> Path:
    """A complete-looking *-state folder whose network belongs to `names`' family."""
    folder.mkdir()
    (folder / "train_state.json").write_text(json.dumps({"global_step": 1}))
    lora_file(folder / "network.safetensors", names)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.save({}, folder / name)
    return folder


def test_resume_from_a_run_of_another_family(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    state = fake_state(tmp_path / "sdxl_run-state", SDXL_NAMES)
    assert errors(base_args(tiny_sd1_dir, data, out, "--resume", str(state)), capsys) == [
        f"--resume: {state} holds the state of SDXL training (modules like {SDXL_NAMES[0]}), but "
        "train_network.py trains SD 1.x/2.x; resume it with sdxl_train_network.py, or pass a *-state folder "
        "this script saved"
    ]


def test_resume_from_the_output_folder_of_another_run(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path, capsys, no_weights
) -> None:
    """A run's output folder (its LoRA files) instead of the *-state folder inside it."""
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "last.safetensors").write_bytes(EARLIER)
    assert errors(base_args(tiny_sd1_dir, data, out, "--resume", str(other)), capsys) == [
        f"--resume: {other} has no train_state.json; it is not a state saved by --save_state"
    ]


# --------------------------------------------------------------------------------------------- outputs


def test_output_dir_that_is_a_file(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, no_weights
) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(EARLIER)
    stamp = target.stat().st_mtime_ns
    assert errors(base_args(tiny_sd1_dir, data, target), capsys) == [
        f"--output_dir: {target} is a file, not a folder; pass a folder path (it is created if missing)"
    ]
    assert errors(base_args(tiny_sd1_dir, data, target / "sub"), capsys) == [
        f"--output_dir: {target} is a file, so {target / 'sub'} cannot be created; pass another folder"
    ]
    assert (target.read_bytes(), target.stat().st_mtime_ns) == (EARLIER, stamp)


def test_logging_dir_that_is_a_file(tiny_sd1_dir: Path, data: Path, out: Path, capsys, no_weights) -> None:
    """Found before training, not by TensorBoard's writer after the weights are loaded."""
    logs = out / "e2e.safetensors"
    assert errors(base_args(tiny_sd1_dir, data, out, "--logging_dir", str(logs)), capsys) == [
        f"--logging_dir: {logs} is a file, not a folder; pass a folder path (it is created if missing)"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders; chmod does not bite")
def test_output_dir_that_is_not_writable(
    tiny_sd1_dir: Path, data: Path, out: Path, capsys, no_weights
) -> None:
    out.chmod(0o500)
    try:
        assert errors(base_args(tiny_sd1_dir, data, out), capsys) == [
            f"--output_dir: cannot write to {out} (permission denied); pass a folder you can write to or fix "
            "its permissions"
        ]
        assert errors(base_args(tiny_sd1_dir, data, out / "new"), capsys) == [
            f"--output_dir: cannot write to {out} (permission denied); pass a folder you can write to or fix "
            "its permissions"
        ]
    finally:
        out.chmod(0o700)


def test_output_dir_without_write_permission_as_root_too(
    tiny_sd1_dir: Path, data: Path, out: Path, capsys, no_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check where chmod cannot bite (root, as in CI containers): os.access answers as it would
    for a user without write permission on `out`."""
    import library.validate as validate

    real_access = os.access
    monkeypatch.setattr(validate.os, "access", lambda p, mode: Path(p) != out and real_access(p, mode))
    assert errors(base_args(tiny_sd1_dir, data, out / "new"), capsys) == [
        f"--output_dir: cannot write to {out} (permission denied); pass a folder you can write to or fix "
        "its permissions"
    ]


# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--network_train_unet_only", "--network_train_text_encoder_only"],
         "--network_train_unet_only and --network_train_text_encoder_only exclude each other; pick one"),
        (["--full_fp16", "--full_bf16"],
         "--full_fp16 and --full_bf16 exclude each other: the LoRA parameters have one dtype; pick one"),
        (["--cache_latents", "--color_aug"],
         "--cache_latents is not compatible with color_aug: subset {sub} has color_aug = true (a cached latent "
         "would freeze one augmented sample); remove color_aug or --cache_latents"),
        (["--fused_backward_pass", "--gradient_accumulation_steps", "2"],
         "--fused_backward_pass steps the optimizer inside each backward, so gradients cannot be accumulated "
         "over micro-batches; drop --gradient_accumulation_steps 2 (raise --train_batch_size instead) or drop "
         "the flag"),
        (["--cache_text_encoder_outputs"],
         "--cache_text_encoder_outputs needs --network_train_unet_only: a text-encoder LoRA changes the text "
         "encoder's outputs at every step, so they cannot be cached; add --network_train_unet_only or remove "
         "--cache_text_encoder_outputs"),
        (["--min_timestep", "500", "--max_timestep", "100"],
         "--min_timestep/--max_timestep must satisfy 0 <= min < max <= 1000, got 500 and 100"),
    ],
    ids=["unet-te-only", "fp16-bf16", "cache-color-aug", "fused-accumulation", "te-cache-te-lora", "timesteps"],
)  # fmt: skip
def test_incompatible_flags(
    flags: list[str], expected: str, tiny_sd1_dir: Path, data: Path, out: Path, capsys, no_weights
) -> None:
    argv = base_args(tiny_sd1_dir, data, out, *flags)
    assert errors(argv, capsys) == [expected.format(sub=data / "2_sks shape")]


def test_noise_offset_with_multires_noise(
    tiny_sd1_dir: Path, data: Path, out: Path, capsys, no_weights
) -> None:
    flags = ["--noise_offset", "0.05", "--multires_noise_iterations", "6"]
    (error,) = errors(base_args(tiny_sd1_dir, data, out, *flags), capsys)
    assert error.startswith("--noise_offset and --multires_noise_iterations exclude each other")


# ------------------------------------------------------------------------------------------ real scripts


def script(name: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / name), *argv, "--overwrite"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_scripts_refuse_bad_inputs_in_a_real_process(
    tiny_sd1_dir: Path, data: Path, out: Path, tmp_path: Path
) -> None:
    """The actual scripts: an SD model to the SDXL and FLUX scripts, and a code-running .ckpt to
    train_network.py; stderr is the error line alone, and the code in the pickle never runs."""
    marker = tmp_path / "code ran"
    evil = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}, evil)
    cases = [
        ("sdxl_train_network.py", tiny_sd1_dir,
         f"{tiny_sd1_dir} is an SD 1.x/2.x model folder; use train_network.py"),
        ("flux_train_network.py", tiny_sd1_dir,
         f"{tiny_sd1_dir} has no transformer/ folder, so it is not FLUX.1; use train_network.py"),
        ("train_network.py", evil,
         f"{evil} is not a plain weights pickle (loading it would call posix.system; refused, as it could run "
         "code): convert it to .safetensors with a tool you trust, or get the .safetensors version"),
    ]  # fmt: skip
    for name, model, message in cases:
        proc = script(name, base_args(model, data, out), tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("INFO ")]  # the log
        assert lines == [f"error: --pretrained_model_name_or_path: {message}"], name
    assert not marker.exists()

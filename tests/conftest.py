"""Shared fixtures: tiny random SD 1.x / 2.x / SDXL / FLUX.1 models, written once per test session.

Each version is written in both layouts from the same weights, so `tiny_sdX_dir` (diffusers folder) and
`tiny_sdX_single_file` (LDM .safetensors + tokenizer folder) hold identical models. Treat them as
read-only; copy into `tmp_path` before changing anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # let `pytest` from any directory import library/, networks/, tools/
    sys.path.insert(0, str(ROOT))

from library.families.tiny import TinyModelFiles, TinySingleFile, write_tiny_model  # noqa: E402


def _tiny(tmp_path_factory: pytest.TempPathFactory, version: str) -> TinyModelFiles:
    out = tmp_path_factory.mktemp(f"tiny_{version}") / f"tiny-{version}"
    return write_tiny_model(out, version=version, fmt="both", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_files(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFiles:
    return _tiny(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_files(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFiles:
    return _tiny(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tiny_sd1_files: TinyModelFiles) -> Path:
    """Diffusers folder of a tiny SD1 model (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    assert tiny_sd1_files.diffusers_dir is not None
    return tiny_sd1_files.diffusers_dir


@pytest.fixture(scope="session")
def tiny_sd1_single_file(tiny_sd1_files: TinyModelFiles) -> TinySingleFile:
    """(checkpoint .safetensors in LDM layout, tokenizer folder for --tokenizer_path); same weights as tiny_sd1_dir."""
    assert tiny_sd1_files.single_file is not None
    return tiny_sd1_files.single_file


@pytest.fixture(scope="session")
def tiny_sd2_dir(tiny_sd2_files: TinyModelFiles) -> Path:
    assert tiny_sd2_files.diffusers_dir is not None
    return tiny_sd2_files.diffusers_dir


@pytest.fixture(scope="session")
def tiny_sd2_single_file(tiny_sd2_files: TinyModelFiles) -> TinySingleFile:
    assert tiny_sd2_files.single_file is not None
    return tiny_sd2_files.single_file


@pytest.fixture(scope="session")
def tiny_sdxl_files(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFiles:
    from library.families.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl", fmt="both", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_sdxl_files: TinyModelFiles) -> Path:
    """Diffusers folder of a tiny SDXL (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)."""
    assert tiny_sdxl_files.diffusers_dir is not None
    return tiny_sdxl_files.diffusers_dir


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tiny_sdxl_files: TinyModelFiles) -> TinySingleFile:
    """Stability-layout .safetensors with the same weights; tokenizers: tokenizer_dir and its sibling _2."""
    assert tiny_sdxl_files.single_file is not None
    return tiny_sdxl_files.single_file


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory):
    """Tiny FLUX.1 dev as kohya's separate files (BFL transformer, ae, clip_l, t5xxl_fp16 + tokenizer folders)
    and as a diffusers folder (`.diffusers_dir`), same weights."""
    from library.families.tiny_flux import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "dev", fmt="both", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory: pytest.TempPathFactory):
    """Tiny FLUX.1 schnell (no guidance embedder) as separate files, transformer keys under model.diffusion_model."""
    from library.families.tiny_flux import write_tiny_flux

    return write_tiny_flux(
        tmp_path_factory.mktemp("tiny_flux") / "schnell", schnell=True, prefixed=True, seed=1
    )


@pytest.fixture
def data2(tmp_path: Path) -> Path:
    """2 images x 2 repeats = 4 items: 2 batches of 2 per epoch."""
    from train_helpers import make_images

    return make_images(tmp_path / "data", n=2)

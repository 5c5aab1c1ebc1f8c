"""StableDiffusionFamily: inspect/load of both layouts, error texts, --vae, prompts, noise/target, predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.families import get_family, sd_text
from library.families import sd_checkpoint as ckpt
from library.families.base import ModelBundle
from library.families.sd import StableDiffusionFamily
from library.families.tiny import TinySingleFile, build_tiny_sd, save_diffusers_folder

FAMILY = StableDiffusionFamily()


def _load(path: Path, tokenizer: Path | None = None, vae: Path | None = None, **inspect_kw) -> ModelBundle:
    info = FAMILY.inspect(path, v2=inspect_kw.get("v2", False), v_parameterization=inspect_kw.get("v", False))
    return FAMILY.load(info, vae_path=vae, tokenizer_path=tokenizer, dtype=torch.float32)


@pytest.fixture(scope="module")
def sd1_bundle(tiny_sd1_dir: Path) -> ModelBundle:
    return _load(tiny_sd1_dir)


@pytest.fixture(scope="module")
def sd2_bundle(tiny_sd2_dir: Path) -> ModelBundle:
    return _load(tiny_sd2_dir)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_registry():
    assert get_family("sd").name == "sd"
    with pytest.raises(UserError, match='unknown model family .*did you mean "sd"'):
        get_family("sdd")


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_both_layouts_load_identical_modules(request: pytest.FixtureRequest, version: str):
    folder: Path = request.getfixturevalue(f"tiny_{version}_dir")
    single: TinySingleFile = request.getfixturevalue(f"tiny_{version}_single_file")
    a = request.getfixturevalue(f"{version}_bundle")
    b = _load(single.checkpoint, tokenizer=single.tokenizer_dir)
    assert b.info.layout == "single_file" and a.info.layout == "diffusers"
    assert a.info.family == b.info.family == version
    for ma, mb in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoders[0], b.text_encoders[0])):
        _assert_same(ma, mb)
        assert [type(m).__name__ for m in ma.modules()] == [type(m).__name__ for m in mb.modules()]
    assert a.text_encoders[0].config.num_hidden_layers == b.text_encoders[0].config.num_hidden_layers == 3
    assert a.text_encoders[0].config.hidden_act == b.text_encoders[0].config.hidden_act
    assert not any(p.requires_grad for p in b.unet.parameters()) and not b.unet.training
    assert a.tokenizers[0].get_vocab() == b.tokenizers[0].get_vocab()
    assert folder.is_dir()


def test_load_dtype_keeps_vae_fp32(tiny_sd1_single_file: TinySingleFile):
    bundle = FAMILY.load(
        FAMILY.inspect(tiny_sd1_single_file.checkpoint, v2=False, v_parameterization=False),
        vae_path=None,
        tokenizer_path=tiny_sd1_single_file.tokenizer_dir,
        dtype=torch.bfloat16,
    )
    assert next(bundle.unet.parameters()).dtype == torch.bfloat16
    assert next(bundle.text_encoders[0].parameters()).dtype == torch.bfloat16
    assert next(bundle.vae.parameters()).dtype == torch.float32


def test_ckpt_single_file_loads(
    tmp_path: Path, sd2_bundle: ModelBundle, tiny_sd2_single_file: TinySingleFile
):
    components = {"unet": sd2_bundle.unet, "vae": sd2_bundle.vae, "text_encoder": sd2_bundle.text_encoders[0]}
    path = ckpt.save_single_file(components, tmp_path / "model.ckpt", "sd2")
    bundle = _load(path, tokenizer=tiny_sd2_single_file.tokenizer_dir)
    assert bundle.info.family == "sd2" and bundle.info.layout == "single_file"
    _assert_same(bundle.unet, sd2_bundle.unet)
    _assert_same(bundle.text_encoders[0], sd2_bundle.text_encoders[0])


@pytest.mark.parametrize("layout", ["dir", "single_file"])
def test_detects_versions_without_v2(request: pytest.FixtureRequest, layout: str):
    for version, expected in (
        ("sd1", ("sd_v1", "stable-diffusion-v1/lora")),
        ("sd2", ("sd_v2", "stable-diffusion-v2-512/lora")),
    ):
        path = request.getfixturevalue(f"tiny_{version}_{layout}")
        info = FAMILY.inspect(
            path.checkpoint if layout == "single_file" else path, v2=False, v_parameterization=False
        )
        assert (info.family, info.v2, info.v_parameterization) == (version, version == "sd2", False)
        assert (info.base_model_version, info.modelspec_architecture) == expected
        assert info.modelspec_implementation == "diffusers" and info.default_resolution == 512


def test_v2_flag_with_sd1_is_an_error(tiny_sd1_single_file: TinySingleFile):
    with pytest.raises(UserError, match=r"--v2: .* is an SD 1.x model .*remove --v2"):
        FAMILY.inspect(tiny_sd1_single_file.checkpoint, v2=True, v_parameterization=False)


def test_v_parameterization_info(tiny_sd1_dir: Path, tiny_sd2_single_file: TinySingleFile):
    info = FAMILY.inspect(tiny_sd2_single_file.checkpoint, v2=True, v_parameterization=True)
    assert info.base_model_version == "sd_v2_v"
    assert info.modelspec_architecture == "stable-diffusion-v2-768-v/lora"
    assert info.default_resolution == 768
    info = FAMILY.inspect(tiny_sd1_dir, v2=False, v_parameterization=True)
    assert (info.base_model_version, info.modelspec_architecture) == ("sd_v1_v", "stable-diffusion-v1/lora")


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_v_prediction_read_from_scheduler_config(tiny_sd2_dir: Path, tmp_path: Path):
    folder = _copy(tiny_sd2_dir, tmp_path)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    info = FAMILY.inspect(folder, v2=False, v_parameterization=False)
    assert info.v_parameterization and info.base_model_version == "sd_v2_v"


def test_missing_path(tmp_path: Path):
    with pytest.raises(UserError, match=r"--pretrained_model_name_or_path: .*nope does not exist"):
        FAMILY.inspect(tmp_path / "nope", v2=False, v_parameterization=False)


def test_missing_component(tiny_sd1_dir: Path, tmp_path: Path):
    folder = _copy(tiny_sd1_dir, tmp_path)
    shutil.rmtree(folder / "vae")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError) as err:
        FAMILY.inspect(folder, v2=False, v_parameterization=False)
    text = str(err.value)
    assert (
        "missing unet/diffusion_pytorch_model.safetensors, vae/config.json, vae/diffusion_pytorch_model"
        in text
    )
    assert "a diffusers SD folder holds model_index.json and unet/, vae/, text_encoder/" in text
    assert "\n" not in text


def test_sdxl_folder_is_rejected(tiny_sd1_dir: Path, tmp_path: Path):
    folder = _copy(tiny_sd1_dir, tmp_path)
    (folder / "text_encoder_2").mkdir()
    with pytest.raises(UserError, match="is an SDXL checkpoint; use sdxl_train_network.py"):
        FAMILY.inspect(folder, v2=False, v_parameterization=False)
    shutil.rmtree(folder / "text_encoder_2")
    config_path = folder / "unet" / "config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "addition_embed_type": "text_time"})
    )
    with pytest.raises(UserError, match="is an SDXL checkpoint; use sdxl_train_network.py"):
        FAMILY.inspect(folder, v2=False, v_parameterization=False)


def test_missing_tokenizer_for_single_file(
    tiny_sd1_single_file: TinySingleFile, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sd_text, "_from_hub", lambda *args: None)  # as on a machine without network or cache
    info = FAMILY.inspect(tiny_sd1_single_file.checkpoint, v2=False, v_parameterization=False)
    with pytest.raises(UserError) as err:
        FAMILY.load(info, vae_path=None, tokenizer_path=None, dtype=torch.float32)
    assert str(err.value).startswith(
        f"no tokenizer for single-file checkpoint {tiny_sd1_single_file.checkpoint}: pass --tokenizer_path "
        "<folder with vocab.json/merges.txt> (e.g. the tokenizer/ folder of any SD1 diffusers model)"
    )


def test_hub_is_not_tried_offline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sd_text._from_hub("nonexistent-org/nonexistent-tokenizer", None, None) is None


def test_tokenizer_from_kohya_cache_dir(tiny_sd1_single_file: TinySingleFile, tmp_path: Path):
    shutil.copytree(tiny_sd1_single_file.tokenizer_dir, tmp_path / "openai_clip-vit-large-patch14")
    info = FAMILY.inspect(tiny_sd1_single_file.checkpoint, v2=False, v_parameterization=False)
    bundle = FAMILY.load(
        info, vae_path=None, tokenizer_path=None, dtype=torch.float32, tokenizer_cache_dir=tmp_path
    )
    assert len(bundle.tokenizers[0]) == bundle.text_encoders[0].config.vocab_size


def test_bad_tokenizer_path(tiny_sd1_single_file: TinySingleFile, tmp_path: Path):
    info = FAMILY.inspect(tiny_sd1_single_file.checkpoint, v2=False, v_parameterization=False)
    with pytest.raises(UserError, match="--tokenizer_path: .* has no vocab.json/merges.txt"):
        FAMILY.load(info, vae_path=None, tokenizer_path=tmp_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A VAE with different weights, written as folder, full checkpoint, bare LDM file and diffusers file."""
    root = tmp_path_factory.mktemp("vae")
    model = build_tiny_sd("sd1", seed=1, tokenizer_dir=root / "tok")
    save_diffusers_folder(model, root / "model")
    full = ckpt.save_single_file(
        {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}, root / "full.ckpt", "sd1"
    )
    sd = model.vae.state_dict()
    save_file({k: v.contiguous() for k, v in ckpt.vae_to_ldm(sd).items()}, str(root / "bare_ldm.safetensors"))
    save_file(dict(sd), str(root / "diffusers_layout.safetensors"))
    paths = {
        "folder": root / "model" / "vae",
        "model_folder": root / "model",
        "full_checkpoint": full,
        "bare_ldm": root / "bare_ldm.safetensors",
        "diffusers_layout": root / "diffusers_layout.safetensors",
    }
    return model.vae, paths


@pytest.mark.parametrize(
    "kind", ["folder", "model_folder", "full_checkpoint", "bare_ldm", "diffusers_layout"]
)
def test_vae_override(tiny_sd1_dir: Path, other_vae: tuple[torch.nn.Module, dict[str, Path]], kind: str):
    expected, paths = other_vae
    bundle = _load(tiny_sd1_dir, vae=paths[kind])
    _assert_same(bundle.vae, expected)
    assert not any(p.requires_grad for p in bundle.vae.parameters())


def test_vae_override_errors(tiny_sd1_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match="--vae: .*missing.safetensors does not exist"):
        _load(tiny_sd1_dir, vae=tmp_path / "missing.safetensors")
    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(UserError, match="--vae: .*lora.safetensors has no VAE weights"):
        _load(tiny_sd1_dir, vae=tmp_path / "lora.safetensors")


def test_encode_images(sd1_bundle: ModelBundle):
    torch.manual_seed(0)
    latents = FAMILY.encode_images(sd1_bundle, torch.rand(2, 3, 64, 48) * 2 - 1)
    assert latents.shape == (2, 4, 8, 6) and latents.dtype == torch.float32


CAPTIONS = ["a photo of a red circle", "sks dog"]


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_encode_prompts_shapes_and_clip_skip(request: pytest.FixtureRequest, version: str):
    bundle: ModelBundle = request.getfixturevalue(f"{version}_bundle")
    hidden = bundle.text_encoders[0].config.hidden_size
    enc = FAMILY.encode_prompts(bundle, CAPTIONS, clip_skip=None, max_token_length=None)[
        "encoder_hidden_states"
    ]
    assert enc.shape == (2, 77, hidden)
    one = FAMILY.encode_prompts(bundle, CAPTIONS, clip_skip=1, max_token_length=None)["encoder_hidden_states"]
    two = FAMILY.encode_prompts(bundle, CAPTIONS, clip_skip=2, max_token_length=None)["encoder_hidden_states"]
    torch.testing.assert_close(one, enc)
    assert two.shape == enc.shape and not torch.allclose(two, enc)
    for length in (150, 225):
        long = FAMILY.encode_prompts(bundle, CAPTIONS, clip_skip=2, max_token_length=length)
        assert long["encoder_hidden_states"].shape == (2, length + 2, hidden)
    # Causal attention: the first window's first 76 states equal those of the plain 77-token encoding.
    long = FAMILY.encode_prompts(bundle, CAPTIONS, clip_skip=None, max_token_length=150)[
        "encoder_hidden_states"
    ]
    torch.testing.assert_close(long[:, :76], enc[:, :76])


def test_encode_prompts_rejects_bad_values(sd1_bundle: ModelBundle):
    with pytest.raises(UserError, match="--max_token_length: 100 is not supported; use 150 or 225"):
        FAMILY.encode_prompts(sd1_bundle, CAPTIONS, clip_skip=None, max_token_length=100)
    with pytest.raises(UserError, match=r"--clip_skip: 4 is out of range; use 1..3"):
        FAMILY.encode_prompts(sd1_bundle, CAPTIONS, clip_skip=4, max_token_length=None)


def test_long_prompt_windows_sd2_padding(sd2_bundle: ModelBundle):
    tokenizer = sd2_bundle.tokenizers[0]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # SD2 pads with "!"
    ids = sd_text._chunked_ids(tokenizer, ["a photo of a dog"], n_chunks=3, window=77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids.shape == (1, 3, 77)
    assert (ids[0, :, 0] == bos).all()
    # Windows after the caption are empty: BOS EOS pad ... (kohya's fix-up).
    assert ids[0, 1, 1] == eos and ids[0, 2, 1] == eos


@pytest.mark.parametrize("v_param", [False, True])
def test_noisy_input_and_target_match_diffusers(sd1_bundle: ModelBundle, v_param: bool):
    from dataclasses import replace

    from diffusers import DDPMScheduler

    info = replace(sd1_bundle.info, v_parameterization=v_param)
    bundle = replace(sd1_bundle, info=info, cache={})
    from library.families.sd import make_noise_scheduler

    bundle.noise_scheduler = make_noise_scheduler(v_param)
    reference = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    torch.manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([0, 1, 500, 999])
    noisy, target = FAMILY.noisy_input_and_target(bundle, latents, noise, timesteps)
    torch.testing.assert_close(noisy, reference.add_noise(latents, noise, timesteps), atol=1e-6, rtol=0)
    expected = reference.get_velocity(latents, noise, timesteps) if v_param else noise
    torch.testing.assert_close(target, expected, atol=1e-6, rtol=0)
    assert len(bundle.cache) == 1
    FAMILY.noisy_input_and_target(bundle, latents, noise, timesteps)
    assert len(bundle.cache) == 1  # reused, not rebuilt
    # An in-place change of the schedule (e.g. zero terminal SNR) is picked up.
    bundle.noise_scheduler.alphas_cumprod[999] = 0.0
    noisy, _ = FAMILY.noisy_input_and_target(bundle, latents, noise, timesteps)
    torch.testing.assert_close(noisy[3], noise[3])


def test_predict_shape(sd1_bundle: ModelBundle):
    cond = FAMILY.encode_prompts(sd1_bundle, CAPTIONS, clip_skip=None, max_token_length=None)
    noisy = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        pred = FAMILY.predict(sd1_bundle, noisy, torch.tensor([10, 900]), cond)
    assert pred.shape == noisy.shape


def test_make_tiny_model_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from tools.make_tiny_model import main

    assert main(["--out", str(tmp_path / "m"), "--version", "sd2", "--format", "single_file"]) == 0
    assert (tmp_path / "m.safetensors").is_file() and (tmp_path / "m_tokenizer" / "vocab.json").is_file()
    assert "--tokenizer_path" in capsys.readouterr().out
    info = FAMILY.inspect(tmp_path / "m.safetensors", v2=False, v_parameterization=False)
    assert info.family == "sd2"


def test_token_cache_gives_identical_ids_and_is_bounded(monkeypatch):
    from library.families import sd_text
    from library.families.tiny import build_tiny_sd

    tok = build_tiny_sd("sd1").tokenizer
    captions = ["a photo of sks dog", "red circle", "a photo of sks dog"]
    cache: dict = {}
    for n_chunks, window in ((1, 77), (2, 77)):
        expected = sd_text._chunked_ids(tok, captions, n_chunks, window)
        assert torch.equal(sd_text.cached_ids(tok, captions, n_chunks, window, cache), expected)
        assert torch.equal(sd_text.cached_ids(tok, captions, n_chunks, window, cache), expected)
    assert len(cache) == 4  # two distinct captions x two chunkings
    monkeypatch.setattr(sd_text, "TOKEN_CACHE_LIMIT", 4)
    sd_text.cached_ids(tok, ["blue square"], 1, 77, cache)
    assert list(cache) == [("blue square", 1)]

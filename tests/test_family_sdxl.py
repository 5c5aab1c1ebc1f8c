"""The SDXL family on the tiny SDXL: both layouts, detection both ways, text encoding, size conditioning."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.families import get_family
from library.families.tiny import TinySingleFile

SDXL = get_family("sdxl")
SD = get_family("sd")


def _load(path: Path, single: TinySingleFile | None = None, **kwargs):
    info = SDXL.inspect(path, v2=False, v_parameterization=False)
    tokenizers = {}
    if single is not None:
        tok = single.tokenizer_dir
        tokenizers = {"tokenizer_path": tok, "tokenizer_2_path": tok.with_name(tok.name + "_2")}
    return SDXL.load(
        info, vae_path=None, dtype=torch.float32, **{"tokenizer_path": None, **tokenizers, **kwargs}
    )


@pytest.fixture(scope="module")
def bundle(tiny_sdxl_dir: Path):
    return _load(tiny_sdxl_dir)


def test_folder_and_single_file_load_identical_modules(bundle, tiny_sdxl_single_file: TinySingleFile):
    other = _load(tiny_sdxl_single_file.checkpoint, tiny_sdxl_single_file)
    assert other.info.layout == "single_file" and bundle.info.layout == "diffusers"
    pairs = [(bundle.unet, other.unet), (bundle.vae, other.vae)]
    pairs += list(zip(bundle.text_encoders, other.text_encoders, strict=True))
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert type(ours) is type(theirs) and set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert bundle.unet.config.addition_time_embed_dim == other.unet.config.addition_time_embed_dim == 8
    assert list(other.unet.config.transformer_layers_per_block) == [1, 1, 2]
    assert bundle.vae_scale == 0.13025 and len(bundle.tokenizers) == 2
    assert bundle.tokenizers[1].pad_token == "!" and bundle.tokenizers[0].pad_token == "<|endoftext|>"


def test_model_info_carries_kohya_sdxl_strings(tiny_sdxl_dir: Path):
    info = SDXL.inspect(tiny_sdxl_dir, v2=False, v_parameterization=False)
    assert (info.family, info.base_model_version, info.default_resolution) == ("sdxl", "sdxl_base_v1-0", 1024)
    assert info.modelspec_architecture == "stable-diffusion-xl-v1-base/lora"
    assert info.modelspec_implementation == "https://github.com/Stability-AI/generative-models"
    assert SDXL.bucket_reso_steps_multiple == 32


def _error(call) -> str:
    with pytest.raises(UserError) as exc:
        call()
    return "\n".join(exc.value.problems)


def test_wrong_script_is_named_both_ways(
    tiny_sdxl_dir, tiny_sdxl_single_file, tiny_sd1_dir, tiny_sd1_single_file
):
    for path in (tiny_sdxl_dir, tiny_sdxl_single_file.checkpoint):
        assert "use sdxl_train_network.py" in _error(
            lambda p=path: SD.inspect(p, v2=False, v_parameterization=False)
        )
    for path in (tiny_sd1_dir, tiny_sd1_single_file.checkpoint):
        message = _error(lambda p=path: SDXL.inspect(p, v2=False, v_parameterization=False))
        assert "is an SD 1.x/2.x" in message and "use train_network.py" in message
    assert "remove --v2" in _error(lambda: SDXL.inspect(tiny_sdxl_dir, v2=True, v_parameterization=False))


def test_incomplete_folder_names_what_is_missing(tiny_sdxl_dir: Path, tmp_path: Path):
    broken = shutil.copytree(tiny_sdxl_dir, tmp_path / "m")
    shutil.rmtree(broken / "text_encoder_2")
    message = _error(lambda: SDXL.inspect(broken, v2=False, v_parameterization=False))
    assert "is an SD 1.x/2.x model folder" in message  # one text encoder: an SD folder, named as such
    broken = shutil.copytree(tiny_sdxl_dir, tmp_path / "m2")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert "is missing vae/diffusion_pytorch_model.safetensors" in _error(
        lambda: SDXL.inspect(broken, v2=False, v_parameterization=False)
    )


def test_single_file_without_tokenizers_says_which_flag(tiny_sdxl_single_file: TinySingleFile, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = SDXL.inspect(tiny_sdxl_single_file.checkpoint, v2=False, v_parameterization=False)
    message = _error(lambda: SDXL.load(info, vae_path=None, tokenizer_path=None, dtype=torch.float32))
    assert "--tokenizer_path" in message
    message = _error(
        lambda: SDXL.load(
            info, vae_path=None, tokenizer_path=tiny_sdxl_single_file.tokenizer_dir, dtype=torch.float32
        )
    )
    assert "--tokenizer_2_path" in message and "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k" in message


def test_prompts_encode_as_stability_trained(bundle):
    te1, te2 = bundle.text_encoders
    tok1, tok2 = bundle.tokenizers
    captions = ["a photo of a red circle", "sks dog"]
    with torch.no_grad():
        cond = SDXL.encode_prompts(bundle, captions, clip_skip=None, max_token_length=None)
        ids1 = tok1(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        ids2 = tok2(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
    assert set(cond) == {"hidden_state1", "hidden_state2", "pool2"}
    assert cond["hidden_state1"].shape == (2, 77, 64) and cond["hidden_state2"].shape == (2, 77, 128)
    assert cond["pool2"].shape == (2, 96)
    assert torch.equal(cond["hidden_state1"], h1)  # penultimate layer, no final layer norm
    assert torch.equal(cond["hidden_state2"], out2.hidden_states[-2])
    eos = (ids2 == tok2.eos_token_id).int().argmax(-1)
    assert (ids2[0, eos[0] + 1 :] == 0).all()  # padded with "!" (id 0) after the first EOS
    pooled = te2.text_projection(out2.last_hidden_state[torch.arange(2), eos])
    assert torch.allclose(cond["pool2"], pooled, atol=1e-6)
    assert torch.allclose(cond["pool2"], out2.text_embeds, atol=1e-6)


def test_long_prompts_join_windows_and_pool_the_first(bundle):
    caption = ", ".join(["red circle"] * 60)
    with torch.no_grad():
        long = SDXL.encode_prompts(bundle, [caption], clip_skip=None, max_token_length=150)
        short = SDXL.encode_prompts(bundle, [caption], clip_skip=None, max_token_length=None)
    assert long["hidden_state1"].shape == (1, 152, 64) and long["hidden_state2"].shape == (1, 152, 128)
    # The first window holds the same 75 tokens as the short prompt, but ends in EOS only when truncated the
    # same way; the BOS state and the pooled output of window 1 must match the 75-token encoding exactly.
    assert torch.equal(long["hidden_state1"][:, :1], short["hidden_state1"][:, :1])
    assert torch.allclose(long["pool2"], short["pool2"], atol=1e-6)


def test_time_ids_follow_the_batch_geometry(bundle):
    batch = {
        "original_sizes_hw": torch.tensor([[1200, 800], [64, 64]]),
        "crop_top_lefts": torch.tensor([[16, 0], [0, 0]]),
        "target_sizes_hw": torch.tensor([[1024, 768], [64, 64]]),
    }
    cond = SDXL.batch_conditioning(bundle, batch, torch.device("cpu"))
    assert cond["time_ids"].tolist() == [[1200, 800, 16, 0, 1024, 768], [64, 64, 0, 0, 64, 64]]
    assert cond["time_ids"].dtype == torch.float32
    assert SD.batch_conditioning(bundle, batch, torch.device("cpu")) == {}

    with torch.no_grad():
        text = SDXL.encode_prompts(bundle, ["sks dog", "sks dog"], clip_skip=None, max_token_length=None)
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500, 500])
        pred = SDXL.predict(bundle, noisy, t, {**text, **cond})
        same_size = {**cond, "time_ids": cond["time_ids"][[1, 1]]}
        pred_same = SDXL.predict(bundle, noisy, t, {**text, **same_size})
    assert pred.shape == (2, 4, 8, 8)
    assert torch.equal(pred[1], pred_same[1])  # per-sample conditioning
    assert (pred[0] - pred_same[0]).abs().max() > 1e-4  # sizes change the prediction


def test_real_sized_checkpoint_layout_infers_the_real_configs():
    """Stability-layout key names and shapes of the real SDXL (built on the meta device) give back its configs."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.families import sd_checkpoint as ckpt
    from library.families import sdxl_checkpoint as xl
    from library.families.tiny_sdxl import REAL_UNET_CONFIG

    big_g = {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
    }
    with init_empty_weights():
        unet = UNet2DConditionModel(**REAL_UNET_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**big_g, projection_dim=1280, hidden_act="gelu"))
    state = {xl.UNET_PREFIX + k: v for k, v in ckpt.unet_to_ldm(unet.state_dict(), 2).items()}
    state.update(ckpt.clip_to_ldm(te1.state_dict(), xl.TE1_PREFIX))
    state.update(ckpt.open_clip_to_ldm(te2.state_dict(), xl.TE2_PREFIX, sd2_extra_block=False))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes[xl.UNET_PREFIX + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[xl.TE2_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert xl.is_sdxl(shapes)

    config = xl.unet_config_from_shapes(shapes)
    for key, value in REAL_UNET_CONFIG.items():
        assert list(config[key]) == list(value) if isinstance(value, list) else config[key] == value, key
    te1_config, te2_config = xl.text_encoder_configs(shapes)
    assert (te1_config["hidden_size"], te1_config["num_hidden_layers"], te1_config["hidden_act"]) == (
        768,
        12,
        "quick_gelu",
    )
    assert (te2_config["hidden_size"], te2_config["num_hidden_layers"], te2_config["projection_dim"]) == (
        1280,
        32,
        1280,
    )
    assert (te2_config["num_attention_heads"], te2_config["intermediate_size"]) == (20, 5120)

"""The FLUX.1 family on the tiny FLUX: BFL files and diffusers folder, dev/schnell, conversion, packing, math."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.families import flux_checkpoint as fc
from library.families import get_family
from library.families.flux_math import image_ids, pack, unpack

FLUX = get_family("flux")


def _options(files, **extra) -> dict:
    base = {"clip_l": str(files.clip_l), "t5xxl": str(files.t5xxl), "ae": str(files.ae)}
    return {**base, **extra}


def _load(path: Path, files, options: dict):
    info = FLUX.inspect(path, v2=False, v_parameterization=False, options=options)
    bundle = FLUX.load(
        info,
        vae_path=None,
        tokenizer_path=files.clip_tokenizer_dir,
        tokenizer_2_path=files.t5_tokenizer_dir,
        dtype=torch.float32,
    )
    return info, bundle


@pytest.fixture(scope="module")
def dev(tiny_flux):
    return _load(tiny_flux.transformer, tiny_flux, _options(tiny_flux))[1]


def test_separate_files_and_diffusers_folder_load_identical_modules(dev, tiny_flux):
    info, folder = _load(tiny_flux.diffusers_dir, tiny_flux, {})
    assert info.layout == "diffusers" and dev.info.layout == "single_file"
    pairs = [(dev.unet, folder.unet), (dev.vae, folder.vae)]
    pairs += list(zip(dev.text_encoders, folder.text_encoders, strict=True))
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert type(ours) is type(theirs) and set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), type(ours).__name__
    assert (dev.vae_scale, dev.vae_shift) == (0.3611, 0.1159)


def test_dev_and_schnell_are_told_apart_by_the_weights(dev, tiny_flux_schnell):
    assert dev.info.modelspec_architecture == "flux-1-dev/lora" and dev.info.details["t5_length"] == 512
    info = FLUX.inspect(
        tiny_flux_schnell.transformer, v2=False, v_parameterization=False, options=_options(tiny_flux_schnell)
    )
    assert info.details["variant"] == "schnell" and info.modelspec_architecture == "flux-1-schnell/lora"
    assert info.details["t5_length"] == 256  # kohya's schnell default
    assert (info.base_model_version, info.prediction_type) == ("flux1", "flow")
    assert next(iter(load_file(str(tiny_flux_schnell.transformer)))).startswith("model.diffusion_model.")


def test_bfl_layout_round_trips_and_real_config_is_inferred():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from library.families.tiny_flux import REAL_TRANSFORMER_CONFIG

    with init_empty_weights():
        real = FluxTransformer2DModel(**REAL_TRANSFORMER_CONFIG)
    bfl = fc.diffusers_to_bfl(real.state_dict())
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    assert bfl["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    config = fc.transformer_config_from_shapes({k: tuple(v.shape) for k, v in bfl.items()})
    for key, value in REAL_TRANSFORMER_CONFIG.items():
        assert config[key] == value, key
    back = fc.bfl_to_diffusers(bfl)
    assert set(back) == set(real.state_dict())
    assert all(back[k].shape == v.shape for k, v in real.state_dict().items())


def test_weights_are_adopted_without_a_copy(tiny_flux):
    sd = load_file(str(tiny_flux.transformer))
    model = fc.build_transformer(sd, tiny_flux.transformer, torch.float32)
    assert model.x_embedder.weight.data_ptr() == sd["img_in.weight"].data_ptr()
    fused = sd["single_blocks.0.linear1.weight"]
    to_k = model.single_transformer_blocks[0].attn.to_k.weight
    assert to_k.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view into the file
    inner = sd["img_in.weight"].shape[0]
    assert torch.equal(to_k, fused[inner : 2 * inner])


def test_pruned_model_loads_with_its_block_counts(tiny_flux, tmp_path: Path):
    sd = load_file(str(tiny_flux.transformer))
    pruned = {k: v for k, v in sd.items() if not k.startswith(("double_blocks.1.", "single_blocks.1."))}
    path = tmp_path / "pruned.safetensors"
    save_file(pruned, str(path))
    _, bundle = _load(path, tiny_flux, _options(tiny_flux))
    assert (bundle.unet.config.num_layers, bundle.unet.config.num_single_layers) == (1, 1)


def _error(call) -> str:
    with pytest.raises(UserError) as exc:
        call()
    return "\n".join(exc.value.problems)


def test_bad_inputs_name_the_flag(tiny_flux, tiny_sdxl_single_file, tiny_sd1_dir):
    path = tiny_flux.transformer
    no_t5 = {k: v for k, v in _options(tiny_flux).items() if k != "t5xxl"}
    message = _error(lambda: FLUX.inspect(path, v2=False, v_parameterization=False, options=no_t5))
    assert message.startswith("--t5xxl required: a BFL single file holds only the transformer")
    wrong_t5 = _options(tiny_flux, t5xxl=str(tiny_flux.clip_l))
    message = _error(lambda: FLUX.inspect(path, v2=False, v_parameterization=False, options=wrong_t5))
    assert message.startswith(f"--t5xxl: {tiny_flux.clip_l} is not a T5 encoder")
    wrong_ae = _options(tiny_flux, ae=str(tiny_flux.t5xxl))
    assert "--ae:" in _error(lambda: FLUX.inspect(path, v2=False, v_parameterization=False, options=wrong_ae))
    sdxl = tiny_sdxl_single_file.checkpoint
    assert "use sdxl_train_network.py" in _error(
        lambda: FLUX.inspect(sdxl, v2=False, v_parameterization=False, options=_options(tiny_flux))
    )
    assert "use train_network.py" in _error(
        lambda: FLUX.inspect(tiny_sd1_dir, v2=False, v_parameterization=False, options={})
    )
    assert "use flux_train_network.py" in _error(
        lambda: get_family("sd").inspect(path, v2=False, v_parameterization=False)
    )
    assert "remove --v_parameterization" in _error(
        lambda: FLUX.inspect(path, v2=False, v_parameterization=True, options=_options(tiny_flux))
    )


def test_prompts_give_kohyas_three_tensors(dev):
    with torch.no_grad():
        cond = FLUX.encode_prompts(
            dev, ["a photo of a red circle", "sks"], clip_skip=None, max_token_length=None
        )
    assert set(cond) == {
        "l_pooled",
        "t5_out",
        "t5_attn_mask",
        "txt_ids",
        "apply_t5_attn_mask",
    }  # kohya's keys
    assert cond["txt_ids"].shape == (2, 512, 3) and not cond["txt_ids"].any()
    assert cond["apply_t5_attn_mask"].tolist() == [0.0, 0.0]
    assert cond["l_pooled"].shape == (2, 64) and cond["t5_out"].shape == (2, 512, 32)
    assert cond["t5_attn_mask"][1].sum() == 2  # "sks" + </s>
    clip, _ = dev.text_encoders
    ids = dev.tokenizers[0](["sks"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(cond["l_pooled"][1:], clip(ids).pooler_output)


def test_packing_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 8)
    packed = pack(latents)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(unpack(packed, 6, 8), latents)
    ids = image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0] and ids[-1].tolist() == [0.0, 2.0, 3.0]


def test_flow_noising_and_prediction(dev):
    latents, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    timesteps = torch.tensor([250.0, 900.0])
    noisy, target = FLUX.noisy_input_and_target(dev, latents, noise, timesteps)
    assert torch.allclose(noisy[0], 0.75 * latents[0] + 0.25 * noise[0])
    assert torch.equal(target, noise - latents)
    drawn = FLUX.sample_timesteps(dev, latents, 0, 1000)
    assert drawn.shape == (2,) and drawn.dtype == torch.float32 and ((drawn > 0) & (drawn <= 1000)).all()
    with torch.no_grad():
        cond = FLUX.encode_prompts(dev, ["sks", "dog"], clip_skip=None, max_token_length=None)
        pred = FLUX.predict(dev, noisy, timesteps, cond)
        # kohya's default sigma_scaled prediction: noisy - sigma * velocity
        velocity = dev.unet(
            hidden_states=pack(noisy),
            encoder_hidden_states=cond["t5_out"],
            pooled_projections=cond["l_pooled"],
            timestep=timesteps / 1000,
            img_ids=image_ids(8, 8, torch.device("cpu"), torch.float32),
            txt_ids=torch.zeros(512, 3),
            guidance=torch.full((2,), 3.5),
        ).sample
    expected = noisy - (timesteps / 1000).view(-1, 1, 1, 1) * unpack(velocity, 8, 8)
    assert torch.allclose(pred, expected, atol=1e-6)

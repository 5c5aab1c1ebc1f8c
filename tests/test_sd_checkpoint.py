"""Single-file SD checkpoints: exact LDM key names, shape-based inference, round trips, .ckpt safety."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.families import sd_checkpoint as ckpt
from library.families.tiny import build_tiny_sd

# Real SD 1.5 / 2.1 UNet and VAE configs, instantiated on the meta device (no memory, no weights).
REAL_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
REAL_UNET_BY_VERSION = {
    "sd1": {**REAL_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {
        **REAL_UNET,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    },
}


def _meta(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _shapes(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_real_sized_unet_keys_and_inferred_config(version: str):
    from diffusers import UNet2DConditionModel

    unet = _meta(lambda: UNet2DConditionModel(**REAL_UNET_BY_VERSION[version]))
    ldm = ckpt.unet_to_ldm(unet.state_dict(), layers_per_block=2)
    assert len(ldm) == 686  # key count of every SD 1.x/2.x checkpoint's model.diffusion_model.*
    for key in (
        "input_blocks.3.0.op.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight",  # up block 0 has no attention: upsampler in slot 1
        "output_blocks.5.2.conv.weight",
        "output_blocks.11.1.proj_out.weight",
        "time_embed.2.weight",
        "out.2.bias",
    ):
        assert key in ldm, key
    inferred = ckpt.unet_config_from_shapes(_shapes(ldm, ckpt.UNET_PREFIX), version)
    structural = {k: v for k, v in inferred.items() if k not in ("sample_size", "upcast_attention")}
    assert {k: unet.config[k] for k in structural} == structural


def test_real_sized_vae_keys_and_inferred_config():
    from diffusers import AutoencoderKL

    config = {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
    }
    vae = _meta(lambda: AutoencoderKL(**config))
    ldm = ckpt.vae_to_ldm(vae.state_dict())
    assert len(ldm) == 248
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    for key in (
        "decoder.up.3.upsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.norm_out.bias",
    ):
        assert key in ldm, key
    inferred = ckpt.vae_config_from_shapes(_shapes(ldm), prefix="")
    assert {k: vae.config[k] for k in config} == {k: inferred[k] for k in config}


def test_open_clip_layout_and_layer_count():
    te = build_tiny_sd("sd2").text_encoder  # 3 layers, hidden 128
    ldm = ckpt.open_clip_to_ldm(te.state_dict())
    p = ckpt.OPENCLIP_PREFIX
    assert ldm[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (384, 128)
    assert ldm[p + "transformer.resblocks.0.attn.in_proj_bias"].shape == (384,)
    assert ldm[p + "positional_embedding"].shape == (77, 128)
    assert torch.equal(ldm[p + "text_projection"], torch.eye(128))
    for key in ("ln_final.weight", "token_embedding.weight", "transformer.resblocks.2.mlp.c_proj.weight"):
        assert p + key in ldm
    # The written file has one block more (OpenCLIP's last, unused by SD2); reading drops it again.
    assert p + "transformer.resblocks.3.ln_1.weight" in ldm
    assert p + "transformer.resblocks.4.ln_1.weight" not in ldm
    config = ckpt.text_encoder_config_from_shapes(_shapes(ldm), "sd2")
    assert config["num_hidden_layers"] == 3
    assert config["hidden_act"] == "gelu" and config["num_attention_heads"] == 2


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("version", ["sd1", "sd2"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_modules(tmp_path: Path, version: str, suffix: str):
    model = build_tiny_sd(version, seed=3, tokenizer_dir=tmp_path / "tok")
    components = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    path = ckpt.save_single_file(components, tmp_path / f"m{suffix}", version)
    shapes = ckpt.read_shapes(path)
    assert ckpt.detect_version(shapes, path) == version
    sd = ckpt.read_state_dict(path)
    unet = ckpt.ldm_to_unet(sd, ckpt.unet_config_from_shapes(shapes, version), path)
    vae = ckpt.ldm_to_vae(sd, ckpt.vae_config_from_shapes(shapes), path)
    te = ckpt.ldm_to_text_encoder(sd, ckpt.text_encoder_config_from_shapes(shapes, version), version, path)
    _assert_same_weights(model.unet, unet)
    _assert_same_weights(model.vae, vae)
    _assert_same_weights(model.text_encoder, te)
    for key in ("unet", "vae"):
        for name in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types"):
            assert getattr(components[key].config, name) == getattr(
                (unet if key == "unet" else vae).config, name
            )


def test_ckpt_with_state_dict_wrapper_and_extras(tmp_path: Path):
    path = tmp_path / "wrapped.ckpt"
    torch.save(
        {"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, "global_step": 7},
        path,
    )
    assert ckpt.read_shapes(path) == {"model.diffusion_model.out.2.weight": (4, 8, 3, 3)}


class _NotAllowed:
    pass


def test_ckpt_with_pickled_objects_is_refused(tmp_path: Path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": _NotAllowed()}, path)
    refused = (
        r"is not a plain weights pickle \(loading it would call .*_NotAllowed.*convert it to \.safetensors"
    )
    with pytest.raises(UserError, match=refused):
        ckpt.read_shapes(path)


def test_other_extension_is_refused(tmp_path: Path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"--pretrained_model_name_or_path: .*model.pth has extension '.pth'"):
        ckpt.read_shapes(path)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            ["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.out.2.weight"],
            "SDXL checkpoint; use sdxl_train_network.py",
        ),
        (["double_blocks.0.img_attn.qkv.weight"], "FLUX checkpoint; use flux_train_network.py"),
        (
            ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"],
            "FLUX checkpoint; use flux_train_network.py",
        ),
        (["encoder.conv_in.weight", "decoder.conv_out.weight"], "not a full SD 1.x/2.x checkpoint"),
        (["model.diffusion_model.out.2.weight"], "has no text encoder weights"),
    ],
)
def test_detect_version_rejects(tmp_path: Path, keys: list[str], message: str):
    path = tmp_path / "x.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    with pytest.raises(UserError, match=message):
        ckpt.detect_version(ckpt.read_shapes(path), path)

"""Our LoRA files load in diffusers exactly: every key consumed, one PEFT layer per module, same outputs.

This is the format's acceptance test: a kohya-layout file written by `save_lora_file` goes through
`StableDiffusionPipeline.load_lora_weights` (diffusers' kohya conversion + PEFT injection) and the
pipeline's UNet / text encoder must compute what our hooked models compute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_helpers import load_into_pipeline

from library.families.tiny import build_tiny_sd, save_diffusers_folder
from networks.lora import create_network
from networks.lora_file import load_lora_file, save_lora_file

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

CASES = {"lora": {}, "locon": {"conv_dim": "4", "conv_alpha": "1"}}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny_sd1")
    model = build_tiny_sd("sd1", tokenizer_dir=root / "tok")
    return model, save_diffusers_folder(model, root / "model")


@pytest.mark.parametrize("case", sorted(CASES))
def test_diffusers_consumes_every_key_and_matches_outputs(tiny_folder, tmp_path: Path, case: str):
    model, folder = tiny_folder
    network = create_network(1.0, 4, 2.0, model.vae, model.text_encoder, model.unet, **CASES[case])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero up AND down, so every key changes the output
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path / f"{case}.safetensors"
    save_lora_file(path, network.state_dict_for_save(torch.float32), {"ss_network_dim": "4"})
    n_te, n_unet = len(network.text_encoder_loras), len(network.unet_loras)

    # diffusers' kohya converter raises if any key is left unconverted; check the counts it returns.
    state, _ = load_lora_file(path)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    assert len(state) == 3 * (n_te + n_unet)
    assert len(converted) == 2 * (n_te + n_unet) and len(alphas) == n_te + n_unet
    assert sum(k.startswith("unet.") for k in converted) == 2 * n_unet
    assert sum(k.startswith("text_encoder.") for k in converted) == 2 * n_te

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert load_into_pipeline(pipe, path) == []
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == n_unet
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules()) == n_te

    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    ehs = torch.randn(2, 77, 64, generator=gen)
    ids = torch.randint(0, 250, (2, 77), generator=gen)
    with torch.no_grad():
        base_unet = model.unet(x, t, encoder_hidden_states=ehs).sample
        base_te = model.text_encoder(ids).last_hidden_state
        network.apply_to([model.text_encoder], model.unet, True, True)
        try:
            ours_unet = model.unet(x, t, encoder_hidden_states=ehs).sample
            ours_te = model.text_encoder(ids).last_hidden_state
        finally:
            network.remove()
        theirs_unet = pipe.unet(x, t, encoder_hidden_states=ehs).sample
        theirs_te = pipe.text_encoder(ids).last_hidden_state
    assert (ours_unet - base_unet).abs().max() > 1e-2 and (ours_te - base_te).abs().max() > 1e-2
    assert (ours_unet - theirs_unet).abs().max() < 1e-4
    assert (ours_te - theirs_te).abs().max() < 1e-4

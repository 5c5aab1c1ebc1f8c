"""The training step with every loss and noise option on: finite, and no host round trips in it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.families.sd import StableDiffusionFamily
from library.training.losses import LossOptions
from library.training.noise import NoiseOptions
from library.training.step import StepOptions, diffusion_loss

FAMILY = StableDiffusionFamily()


@pytest.mark.parametrize("v_param", [False, True])
def test_step_with_all_options_stays_on_device(
    tiny_sd1_dir: Path, monkeypatch: pytest.MonkeyPatch, v_param: bool
) -> None:
    info = FAMILY.inspect(tiny_sd1_dir, v2=False, v_parameterization=v_param)
    bundle = FAMILY.load(info, vae_path=None, tokenizer_path=None, dtype=torch.float32)
    FAMILY.enforce_zero_terminal_snr(bundle)
    loss = LossOptions(
        loss_type="huber",
        min_snr_gamma=5.0,
        scale_v_pred_loss_like_noise_pred=v_param,
        v_pred_like_loss=None if v_param else 0.1,
        debiased_estimation_loss=True,
    )
    noise = NoiseOptions(
        noise_offset=0.1,
        noise_offset_random_strength=True,
        adaptive_noise_scale=0.01,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
    )
    options = StepOptions(
        0, 999, None, None, False, torch.float32, loss=loss, noise=noise, weighted_captions=True
    )
    batch = {
        "latents": torch.randn(2, 4, 8, 8),
        "captions": ["a (red:1.2) circle", "[sks] dog"],
        "loss_weights": torch.tensor([1.0, 0.5]),
    }
    device = torch.device("cpu")
    diffusion_loss(FAMILY, bundle, batch, options, device)  # builds the device tables once
    tables = {k: v[1] for k, v in bundle.cache.items() if k[0].startswith("sd_")}

    def host_sync(*args: object, **kwargs: object) -> None:
        raise AssertionError("host round trip in the training step")

    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    losses = [diffusion_loss(FAMILY, bundle, batch, options, device) for _ in range(3)]
    monkeypatch.undo()
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses)
    assert {k: v[1] for k, v in bundle.cache.items() if k[0].startswith("sd_")}.keys() == tables.keys()
    assert all(bundle.cache[k][1] is t for k, t in tables.items())  # never rebuilt or re-uploaded

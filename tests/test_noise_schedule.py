"""The SD family's SNR table, zero-terminal-SNR betas and input perturbation, against hand values and
diffusers' own implementation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.families.base import ModelBundle
from library.families.sd import (
    StableDiffusionFamily,
    make_noise_scheduler,
    model_info,
    zero_terminal_snr_betas,
)

FAMILY = StableDiffusionFamily()


def bundle(v_param: bool = False) -> ModelBundle:
    info = model_info(Path("m"), "diffusers", "sd1", v_param, {})
    none = torch.nn.Identity()
    return ModelBundle(info, none, none, [none], [None], make_noise_scheduler(v_param))


def test_snr_per_timestep() -> None:
    b = bundle()
    # t = 0: beta = 0.00085, alphas_cumprod = 0.99915, SNR = 0.99915 / 0.00085.
    snr = FAMILY.snr(b, torch.tensor([0, 0, 999]))
    assert snr.dtype == torch.float32
    assert snr[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)  # float32 table
    ac = b.noise_scheduler.alphas_cumprod[999].item()
    assert snr[2].item() == pytest.approx(ac / (1 - ac), rel=1e-5)
    FAMILY.snr(b, torch.tensor([1]))
    assert len(b.cache) == 1  # one table, built once


def test_zero_terminal_snr_matches_diffusers_and_keeps_first_step() -> None:
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    b = bundle(v_param=True)
    before = b.noise_scheduler.alphas_cumprod.clone()
    FAMILY.snr(b, torch.tensor([999]))  # a table built before the rescale must not survive it
    FAMILY.enforce_zero_terminal_snr(b)
    after = b.noise_scheduler.alphas_cumprod
    assert after[-1].item() == 0.0
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    reference = rescale_zero_terminal_snr(make_noise_scheduler(True).betas)
    torch.testing.assert_close(b.noise_scheduler.betas, reference)
    assert FAMILY.snr(b, torch.tensor([999])).item() == 0.0
    latents, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    noisy, target = FAMILY.noisy_input_and_target(b, latents, noise, torch.tensor([999]))
    assert torch.equal(noisy, noise) and torch.allclose(target, -latents)  # v = -x0 at zero SNR


def test_zero_terminal_snr_betas_hand_example() -> None:
    # betas 0.5, 0.5: sqrt(alphas_cumprod) = [sqrt(.5), .5] -> shifted/rescaled [sqrt(.5), 0].
    betas = zero_terminal_snr_betas(torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert betas.tolist() == pytest.approx([0.5, 1.0])


def test_input_noise_changes_the_input_not_the_target() -> None:
    b = bundle()
    latents, noise, other = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 3.0)
    t = torch.tensor([500])
    noisy, target = FAMILY.noisy_input_and_target(b, latents, noise, t, input_noise=other)
    s = (1 - b.noise_scheduler.alphas_cumprod[500]).sqrt()
    assert torch.allclose(noisy, 3.0 * s * torch.ones_like(noisy)) and torch.equal(target, noise)

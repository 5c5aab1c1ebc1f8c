"""Noise options against the same draws made by hand from seeded generators."""

from __future__ import annotations

import random

import pytest
import torch

from library.training.noise import (
    NoiseOptions,
    apply_noise_offset,
    input_noise,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_default_noise_is_plain_normal() -> None:
    latents = torch.zeros(2, 4, 3, 3)
    expected = torch.randn((2, 4, 3, 3), generator=gen())
    assert torch.equal(sample_noise(latents, NoiseOptions(), gen()), expected)
    assert input_noise(expected, NoiseOptions()) is None


def test_noise_offset_adds_one_draw_per_sample_and_channel() -> None:
    latents = torch.zeros(2, 3, 4, 4)
    g = gen()
    base = torch.randn((2, 3, 4, 4), generator=g)
    offset = torch.randn((2, 3, 1, 1), generator=g)
    got = sample_noise(latents, NoiseOptions(noise_offset=0.1), gen())
    assert torch.allclose(got, base + 0.1 * offset)


def test_noise_offset_random_strength_scales_by_uniform() -> None:
    latents = torch.zeros(1, 2, 2, 2)
    g = gen(3)
    base = torch.randn((1, 2, 2, 2), generator=g)
    strength = torch.rand((1,), generator=g) * 0.2
    offset = torch.randn((1, 2, 1, 1), generator=g)
    options = NoiseOptions(noise_offset=0.2, noise_offset_random_strength=True)
    assert torch.allclose(sample_noise(latents, options, gen(3)), base + strength * offset)


def test_adaptive_noise_scale_uses_abs_channel_mean_clamped_at_zero() -> None:
    latents = torch.stack([torch.full((2, 2), 2.0), torch.full((2, 2), -1.0), torch.full((2, 2), 3.0)])[None]
    draws = torch.randn((1, 3, 1, 1), generator=gen())
    # offsets: 0.1 + 0.5*2 = 1.1, 0.1 + 0.5*1 = 0.6; with offset -1.4 the third is max(0, -1.4 + 1.5) = 0.1.
    got = apply_noise_offset(latents, torch.zeros(1, 3, 2, 2), 0.1, 0.5, gen())
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([1.1, 0.6, 1.6]) * draws.flatten())
    got = apply_noise_offset(latents, torch.zeros(1, 3, 2, 2), -1.4, 0.5, gen())
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([0.0, 0.0, 0.1]) * draws.flatten())


def test_pyramid_noise_octaves() -> None:
    # 2x2 latents: octave 0 is a full-size draw, octave 1 is 1x1 (2 / r < 2 for r in [2, 4)) and stops.
    noise = torch.randn((1, 2, 2, 2), generator=gen(1))
    g = gen(2)
    full = torch.randn((1, 2, 2, 2), generator=g)
    corner = torch.randn((1, 2, 1, 1), generator=g)
    expected = noise + full + 0.5 * corner.expand(1, 2, 2, 2)
    expected = expected / expected.std()
    rng = random.Random(0)
    got = pyramid_noise(noise, iterations=6, discount=0.5, rng=rng, generator=gen(2))
    assert torch.allclose(got, expected, atol=1e-6)
    reference = random.Random(0)
    reference.random(), reference.random()  # one r per octave drawn
    assert rng.getstate() == reference.getstate()
    assert got.std().item() == pytest.approx(1.0, abs=1e-6)


def test_pyramid_octave_sizes_follow_r() -> None:
    class Fixed(random.Random):
        def random(self) -> float:
            return 0.0  # r = 2: 8x8 -> 8, 4, 2, 1

    noise = torch.zeros(1, 1, 8, 8)
    g = gen(5)
    octaves = [torch.randn((1, 1, s, s), generator=g) for s in (8, 4, 2, 1)]
    expected = sum(
        torch.nn.functional.interpolate(o, size=(8, 8), mode="bilinear") * 0.3**i
        for i, o in enumerate(octaves)
    )
    expected = expected / expected.std()
    got = pyramid_noise(noise, iterations=10, discount=0.3, rng=Fixed(), generator=gen(5))
    assert torch.allclose(got, expected, atol=1e-6)


def test_ip_noise_gamma_perturbs_input_only() -> None:
    noise = torch.randn((2, 2, 2, 2), generator=gen(1))
    extra = torch.randn((2, 2, 2, 2), generator=gen(4))
    assert torch.allclose(input_noise(noise, NoiseOptions(ip_noise_gamma=0.1), gen(4)), noise + 0.1 * extra)
    g = gen(4)
    strength = torch.rand((1,), generator=g) * 0.1
    extra = torch.randn((2, 2, 2, 2), generator=g)
    options = NoiseOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    assert torch.allclose(input_noise(noise, options, gen(4)), noise + strength * extra)


def test_timesteps_in_range_on_device() -> None:
    t = sample_timesteps(10, 12, 64, torch.device("cpu"), gen())
    assert t.dtype == torch.long and set(t.tolist()) == {10, 11}

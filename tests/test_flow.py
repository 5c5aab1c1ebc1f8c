"""Flow-matching math (library/training/flow.py) against diffusers' and kohya's formulas, reimplemented here."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from library.config import TrainConfig, parse_config
from library.errors import UserError
from library.training.flow import (
    FlowOptions,
    apply_model_prediction_type,
    fixed_validation_sigmas,
    flow_target,
    flux_shift_mu,
    image_tokens,
    noisy_latents,
    sample_sigmas,
    sigma_table,
    timesteps_from_sigmas,
)
from library.validate import validate

MODES = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _kohya_sigma_mode(scheduler, u: torch.Tensor) -> torch.Tensor:
    """kohya's sigma mode: timesteps from the schedule, then each sigma found by equality (get_sigmas)."""
    timesteps = scheduler.timesteps[(u * 1000).long()]
    return torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])


@pytest.mark.parametrize("shift", [1.0, 3.0, 3.1582])
def test_sigma_table_is_diffusers_schedule(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    table = sigma_table("cpu", shift)
    assert table.dtype == torch.float32 and table.shape == (1000,)
    assert torch.equal(table, scheduler.sigmas)
    assert torch.equal(timesteps_from_sigmas(table), scheduler.timesteps)
    assert sigma_table("cpu", shift) is table  # built once


@pytest.mark.parametrize("scheme", ["uniform", "none", "logit_normal", "mode"])
def test_sigma_mode_matches_kohya_lookup(scheme):
    options = FlowOptions(weighting_scheme=scheme, logit_mean=0.3, logit_std=1.2, discrete_flow_shift=3.0)
    got = sample_sigmas(options, 64, (64, 64), "cpu", generator=_gen())
    u = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=_gen()
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.equal(got, _kohya_sigma_mode(scheduler, u))


def test_sigma_mode_edges_stay_in_the_table():
    # u = sigmoid(+-60) is exactly 1 or ~0: kohya would index past the table at u = 1; we take the last entry.
    high = sample_sigmas(FlowOptions(weighting_scheme="logit_normal", logit_mean=-60.0), 3, (8, 8), "cpu")
    low = sample_sigmas(FlowOptions(weighting_scheme="logit_normal", logit_mean=60.0), 3, (8, 8), "cpu")
    assert high.tolist() == [1.0] * 3
    table = sigma_table("cpu", 3.0)
    assert torch.equal(low, table[-1].repeat(3))
    assert low[0].item() == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))


def test_uniform_sigmoid_shift_modes_by_hand():
    z = torch.randn(32, generator=_gen())
    u = torch.rand(32, generator=_gen())
    t = 1 / (1 + torch.exp(-1.5 * z))
    expected = {
        "uniform": 1 - u,
        "sigmoid": t,
        "shift": 1 / (1 + (1 / t - 1) / 3.0),  # s t / (1 + (s - 1) t), written differently
    }
    for mode, want in expected.items():
        got = sample_sigmas(FlowOptions(timestep_sampling=mode, sigmoid_scale=1.5), 32, (8, 8), "cpu", _gen())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    point = sample_sigmas(FlowOptions(timestep_sampling="shift", sigmoid_scale=1e-9), 1, (8, 8), "cpu")
    assert point.item() == pytest.approx(0.75)  # t = 0.5, shift 3: 1.5 / 2


@pytest.mark.parametrize(
    ("hw", "mu"), [((32, 32), 0.5), ((128, 128), 1.15), ((64, 64), 0.5 + 0.65 * 768 / 3840)]
)
def test_flux_shift_uses_resolution_mu(hw, mu):
    assert flux_shift_mu(image_tokens(hw)) == pytest.approx(mu, abs=1e-12)
    z = torch.randn(16, generator=_gen())
    t = torch.sigmoid(z)
    want = math.exp(mu) * t / (math.exp(mu) * t + 1 - t)
    got = sample_sigmas(FlowOptions(timestep_sampling="flux_shift"), 16, hw, "cpu", _gen())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_image_tokens_and_mu_end_points():
    assert (
        image_tokens((32, 32)) == 256 and image_tokens((128, 128)) == 4096 and image_tokens((33, 31)) == 240
    )
    assert flux_shift_mu(256) == 0.5 and flux_shift_mu(4096) == 1.15


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_shape_range_determinism(mode):
    options = FlowOptions(timestep_sampling=mode)
    a = sample_sigmas(options, 10000, (64, 64), torch.device("cpu"), _gen(3))
    b = sample_sigmas(options, 10000, (64, 64), "cpu", _gen(3))
    assert a.shape == (10000,) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert bool((a > 0).all()) and bool((a <= 1).all())
    assert not torch.equal(a, sample_sigmas(options, 10000, (64, 64), "cpu", _gen(4)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "cosmap"])
def test_no_host_sync_runs_on_meta_device(mode, scheme):
    # A meta tensor has no data: any .item()/.tolist()/.cpu() on the way would raise.
    options = FlowOptions(timestep_sampling=mode, weighting_scheme=scheme)
    sigmas = sample_sigmas(options, 4, (64, 64), "meta")
    assert sigmas.device.type == "meta" and sigmas.shape == (4,) and sigmas.dtype == torch.float32
    latents = torch.empty(4, 16, 64, 64, device="meta")
    pred, weight = apply_model_prediction_type(
        latents, noisy_latents(latents, latents, sigmas), sigmas, options
    )
    assert pred.shape == latents.shape
    assert weight is None if scheme != "cosmap" else weight.shape == (4, 1, 1, 1)


def test_noisy_latents_and_target_by_hand():
    latents = torch.ones(2, 1, 2, 2)
    noise = torch.full((2, 1, 2, 2), 3.0)
    noisy = noisy_latents(latents, noise, torch.tensor([0.25, 1.0]))
    assert noisy[0].unique().tolist() == [1.5] and noisy[1].unique().tolist() == [3.0]
    assert flow_target(latents, noise).unique().tolist() == [2.0]
    half = noisy_latents(latents.bfloat16(), noise.bfloat16(), torch.tensor([0.5, 0.5]))
    assert half.dtype == torch.bfloat16 and half.unique().tolist() == [2.0]


def test_model_prediction_types_by_hand():
    pred = torch.full((2, 1, 1, 2), 2.0)
    noisy = torch.full((2, 1, 1, 2), 1.0)
    sigmas = torch.tensor([0.5, 0.25])
    raw, w = apply_model_prediction_type(pred, noisy, sigmas, FlowOptions(model_prediction_type="raw"))
    assert raw is pred and w is None
    add, w = apply_model_prediction_type(pred, noisy, sigmas, FlowOptions(model_prediction_type="additive"))
    assert add.unique().tolist() == [3.0] and w is None
    scaled, w = apply_model_prediction_type(pred, noisy, sigmas, FlowOptions())
    assert scaled[0].unique().tolist() == [0.0] and scaled[1].unique().tolist() == [0.5]  # 1 - s * 2
    assert w is None  # kohya's weighting is all ones here


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_sigma_scaled_weighting_is_diffusers(scheme):
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    pred = torch.randn(3, 4, 2, 2, generator=_gen())
    _, weight = apply_model_prediction_type(pred, pred, sigmas, FlowOptions(weighting_scheme=scheme))
    want = compute_loss_weighting_for_sd3(scheme, sigmas.view(-1, 1, 1, 1))
    assert weight.shape == (3, 1, 1, 1) and weight.dtype == torch.float32
    torch.testing.assert_close(weight, want, rtol=0, atol=0)
    _, raw_weight = apply_model_prediction_type(
        pred, pred, sigmas, FlowOptions(weighting_scheme=scheme, model_prediction_type="raw")
    )
    assert raw_weight is None  # kohya weighs only sigma_scaled


def test_sigma_scaled_with_velocity_target_is_what_the_docstring_says():
    g = _gen()
    x, n = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    s = torch.tensor([0.2, 0.5, 0.9])
    noisy, target = noisy_latents(x, n, s), flow_target(x, n)
    perfect, _ = apply_model_prediction_type(target, noisy, s, FlowOptions())
    torch.testing.assert_close(perfect, x)  # a perfect velocity becomes the clean latent ...
    torch.testing.assert_close(perfect - target, 2 * x - n)  # ... so its loss is |2x - n|^2, not 0
    sv = s.view(-1, 1, 1, 1)
    optimum, _ = apply_model_prediction_type(n - x + (2 * x - n) / sv, noisy, s, FlowOptions())
    torch.testing.assert_close(optimum, target)


def test_fixed_validation_sigmas():
    uniform = fixed_validation_sigmas(4, FlowOptions(timestep_sampling="uniform"), (64, 64), "cpu")
    assert uniform.tolist() == [0.875, 0.625, 0.375, 0.125]
    shifted = fixed_validation_sigmas(4, FlowOptions(), (64, 64), "cpu")
    torch.testing.assert_close(shifted, 3 * uniform / (1 + 2 * uniform))
    mu = flux_shift_mu(4096)
    flux = fixed_validation_sigmas(2, FlowOptions(timestep_sampling="flux_shift"), (128, 128), "meta")
    assert flux.device.type == "meta"
    flux = fixed_validation_sigmas(2, FlowOptions(timestep_sampling="flux_shift"), (128, 128), "cpu")
    want = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(flux, math.exp(mu) * want / (math.exp(mu) * want + 1 - want))
    again = fixed_validation_sigmas(4, FlowOptions(), (64, 64), "cpu")
    assert torch.equal(again, shifted)
    with pytest.raises(ValueError, match="count"):
        fixed_validation_sigmas(0, FlowOptions(), (8, 8), "cpu")


def test_flow_options_reject_unknown_names():
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowOptions(timestep_sampling="logit")


def test_config_fields_defaults_and_validation(tmp_path):
    config = TrainConfig()
    assert (
        FlowOptions(**{name: getattr(config, name) for name in FlowOptions.__dataclass_fields__})
        == FlowOptions()
    )
    bad = TrainConfig(
        timestep_sampling="logit",
        weighting_scheme="lognorm",
        model_prediction_type="velocity",
        sigmoid_scale=0.0,
        discrete_flow_shift=-1.0,
        logit_std=0.0,
        mode_scale=2.0,
        guidance_scale=-1.0,
    )
    problems = [p for p in validate(bad) if any(k in p for k in FlowOptions.__dataclass_fields__)]
    assert problems == [
        "--timestep_sampling must be one of sigma, uniform, sigmoid, shift, flux_shift, got 'logit'",
        "--weighting_scheme must be one of uniform, none, logit_normal, mode, sigma_sqrt, cosmap, got 'lognorm'",
        "--model_prediction_type must be one of raw, additive, sigma_scaled, got 'velocity'",
        "--sigmoid_scale must be positive, got 0.0",
        "--discrete_flow_shift must be positive, got -1.0",
        "--logit_std must be positive, got 0.0",
        "--guidance_scale must not be negative, got -1.0",
        "--mode_scale must be in [-1, 1.7519] (1.29 is usual), got 2.0",
    ]
    parsed = parse_config(
        ["--timestep_sampling", "flux_shift", "--discrete_flow_shift", "3.1582"], prog="t", description=""
    )
    assert parsed.timestep_sampling == "flux_shift" and parsed.discrete_flow_shift == 3.1582
    toml = tmp_path / "c.toml"
    toml.write_text('[flux]\nweighting_scheme = "cosmap"\n')
    with pytest.raises((UserError, SystemExit)):
        parse_config(["--timestep_sampling", "sigmas"], prog="t", description="")
    assert parse_config(["--config_file", str(toml)], prog="t", description="").weighting_scheme == "cosmap"

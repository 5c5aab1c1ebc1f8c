"""Loss forms, Huber schedules and SNR weights against hand-computed values (kohya's formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from library.training.losses import (
    LossOptions,
    debiased_weight,
    huber_c_for_timesteps,
    min_snr_weight,
    per_element_loss,
    v_pred_noise_scale,
    weight_per_sample_loss,
)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_l2_and_l1_are_elementwise() -> None:
    pred, target = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0]])
    close(per_element_loss(pred, target, "l2")[0], [1.0, 4.0])
    close(per_element_loss(pred, target, "l1")[0], [1.0, 2.0])


def test_pseudo_huber_and_smooth_l1_per_sample_threshold() -> None:
    # d = 0.4, c = 0.3: sqrt(d^2 + c^2) = 0.5; d = 1.2, c = 0.5: 1.3.
    pred = torch.tensor([[0.4], [1.2]])
    target = torch.zeros(2, 1)
    c = torch.tensor([0.3, 0.5])
    close(per_element_loss(pred, target, "huber", c)[:, 0], [2 * 0.3 * 0.2, 2 * 0.5 * 0.8])
    close(per_element_loss(pred, target, "smooth_l1", c)[:, 0], [2 * 0.2, 2 * 0.8])


def test_huber_needs_threshold_and_unknown_type_lists_valid() -> None:
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="huber_c"):
        per_element_loss(x, x, "huber")
    with pytest.raises(ValueError, match="l1, l2, huber, smooth_l1"):
        per_element_loss(x, x, "l3")


def test_huber_schedules() -> None:
    t = torch.tensor([0, 500, 1000])
    constant = huber_c_for_timesteps("constant", t, huber_c=0.1, huber_scale=2.0, num_train_timesteps=1000)
    close(constant, [0.2, 0.2, 0.2])
    expo = huber_c_for_timesteps("exponential", t, huber_c=0.1, huber_scale=2.0, num_train_timesteps=1000)
    close(expo, [2.0, 2.0 * math.sqrt(0.1), 0.2])
    # snr 4 -> sigma 0.5: 0.9 / 1.5^2 + 0.1 = 0.5; snr 1 -> sigma 1: 0.9 / 4 + 0.1; snr 0 -> c (no scale).
    snr = torch.tensor([4.0, 1.0, 0.0])
    by_snr = huber_c_for_timesteps("snr", t, huber_c=0.1, huber_scale=2.0, num_train_timesteps=1000, snr=snr)
    close(by_snr, [0.5, 0.325, 0.1])


def test_min_snr_weight() -> None:
    snr = torch.tensor([1.0, 5.0, 20.0, 0.0])
    close(min_snr_weight(snr, 5.0, v_prediction=False), [1.0, 1.0, 0.25, 1.0])
    close(min_snr_weight(snr, 5.0, v_prediction=True), [0.5, 5 / 6, 5 / 21, 0.0])


def test_v_pred_scale_and_debiased_cap_snr_at_1000() -> None:
    snr = torch.tensor([1.0, 3.0, 2000.0])
    close(v_pred_noise_scale(snr), [0.5, 0.75, 1000 / 1001])
    close(debiased_weight(torch.tensor([4.0, 2000.0]), v_prediction=False), [0.5, 1 / math.sqrt(1000)])
    close(debiased_weight(torch.tensor([4.0, 2000.0]), v_prediction=True), [0.2, 1 / 1001])


def test_weights_apply_in_kohyas_order() -> None:
    loss, snr = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])
    options = LossOptions(min_snr_gamma=2.0, v_pred_like_loss=0.5, debiased_estimation_loss=True)
    # min-SNR (eps): [1, 0.5] -> [2, 1]; v-pred-like: + loss / (snr / (snr + 1)) * 0.5 -> [4, 1.625];
    # debiased (eps): / sqrt(snr) -> [4, 0.8125].
    close(weight_per_sample_loss(loss, snr, options, v_prediction=False), [4.0, 0.8125])
    scaled = LossOptions(scale_v_pred_loss_like_noise_pred=True)
    close(weight_per_sample_loss(loss, snr, scaled, v_prediction=True), [1.0, 1.6])
    assert weight_per_sample_loss(loss, None, LossOptions(), v_prediction=False) is loss


def test_needs_snr_only_when_a_weight_uses_it() -> None:
    assert not LossOptions().needs_snr
    assert not LossOptions(loss_type="huber", huber_schedule="constant").needs_snr
    assert LossOptions(loss_type="smooth_l1").needs_snr  # default schedule is snr
    assert LossOptions(min_snr_gamma=5.0).needs_snr

"""The hot path: host reads per optimizer step, pinned batches, non-blocking copies, the start-up GC pause.

On CUDA every `.item()`, `float(t)`, `if t`, `.tolist()`, `.cpu()` ... of a device tensor makes the host wait
for the GPU to drain its queue. There is no GPU here, so the test counts those calls on every tensor during
real training runs and checks that the steady state makes exactly one per optimizer step: the read of the
step's loss before the optimizer steps (`faults.step_verdict`, which also carries the NaN check, the
stop-signal agreement between ranks and the previous step's max-norm statistics). Each count is keyed by its caller (file:function), so a new read
anywhere on the path fails with its location.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import (
    db_args,
    flux_files_args,
    make_images,
    run_flux,
    run_main,
    run_sdxl,
    tb_scalars,
    tb_tags,
)

import library.training.loop as loop
from library import startup_gc
from library.families import get_family
from library.training import faults
from library.training.progress import MAX_NORM_KEYS
from library.training.step import StepOptions, diffusion_loss

# Tensor methods that read a device tensor on the host (a device sync on CUDA).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")
LOSS_READ = "faults.py:step_verdict"  # the one read per step
EPOCH_READ = "extras.py:after_epoch"  # the epoch's mean loss, once per epoch


def _exempt(frame) -> bool:
    """torch optimizers read their step counters with `.item()`: host tensors on every device (unless
    capturable/fused), so no sync."""
    return frame.f_code.co_name == "_get_value" and frame.f_code.co_filename.endswith("optimizer.py")


class HostReads:
    """Counts HOST_READS calls by caller, split at each optimizer step (the loop's StepClock.tick)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.marks: list[int] = []
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))
        original_tick = loop.StepClock.tick

        def tick(clock: loop.StepClock) -> None:
            self.marks.append(len(self.calls))
            original_tick(clock)

        monkeypatch.setattr(loop.StepClock, "tick", tick)

    def _counting(self, method):
        calls = self.calls

        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if not _exempt(caller):
                calls.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}")
            return method(tensor, *args, **kwargs)

        return counted

    def between_steps(self) -> list[Counter]:
        """Reads from the end of step k to the end of step k + 1 (the rest of step k's bookkeeping and
        step k + 1's data, forward, backward and optimizer step), for k = 1 .. last - 1."""
        return [Counter(self.calls[a:b]) for a, b in zip(self.marks, self.marks[1:], strict=False)]

    def after_last_step(self) -> Counter:
        return Counter(self.calls[self.marks[-1] :])


# Six optimizer steps in one epoch: 4 images x 3 repeats = 12 items, batch 2 (x2 repeats with accumulation).
SD_CASES = {
    "defaults": ([], 3),
    "max_norm": (["--scale_weight_norms", "1.0"], 3),  # its statistics ride in the loss's copy
    "te_cache_accumulation": (
        ["--cache_text_encoder_outputs", "--network_train_unet_only", "--gradient_accumulation_steps", "2"],
        6,
    ),
    "loss_and_noise_options": (
        ["--min_snr_gamma", "5", "--loss_type", "huber", "--noise_offset", "0.1"]
        + ["--noise_offset_random_strength", "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength"],
        3,
    ),
}


def _expect_one_read_per_step(reads: HostReads, max_norm: bool = False) -> None:
    # Each step reads its own loss before its optimizer step (the previous step's statistics ride along).
    assert reads.between_steps() == [Counter({LOSS_READ: 1})] * 5
    # After the last step: the epoch mean, and the last step's max-norm statistics.
    last = Counter({EPOCH_READ: 1}) + (Counter({"loop.py:_train_loop": 1}) if max_norm else Counter())
    assert reads.after_last_step() == last


@pytest.mark.parametrize("case", list(SD_CASES))
def test_sd_training_reads_the_host_once_per_optimizer_step(
    case: str, tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    extra, repeats = SD_CASES[case]
    data = make_images(tmp_path / "data", n=4, repeats=repeats)
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--max_train_steps", "6", "--cache_latents", *extra)
    args += ["--logging_dir", str(tmp_path / "logs")]  # TensorBoard scalars every step, from host floats
    reads = HostReads(monkeypatch)
    assert run_main(args) == 0
    _expect_one_read_per_step(reads, max_norm=case == "max_norm")
    logged = tb_tags(tmp_path / "logs")
    norms = [tag for tag in logged if tag.startswith("max_norm/")]
    assert norms == (sorted(MAX_NORM_KEYS) if case == "max_norm" else [])
    for tag in ["loss/current", *norms]:  # every step's values, each at its own step
        assert [point.step for point in tb_scalars(tmp_path / "logs", tag)] == [1, 2, 3, 4, 5, 6], tag


def test_sdxl_training_reads_the_host_once_per_optimizer_step(
    tiny_sdxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    data = make_images(tmp_path / "data", n=4, repeats=3)
    args = db_args(tiny_sdxl_dir, data, tmp_path / "out", "--max_train_steps", "6", "--cache_latents")
    reads = HostReads(monkeypatch)
    assert run_sdxl(args) == 0
    _expect_one_read_per_step(reads)


def test_flux_training_reads_the_host_once_per_optimizer_step(
    tiny_flux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    data = make_images(tmp_path / "data", n=4, repeats=3)
    args = db_args(tiny_flux.transformer, data, tmp_path / "out", "--max_train_steps", "6", "--cache_latents")
    args += flux_files_args(tiny_flux) + ["--network_module", "networks.lora_flux"]
    reads = HostReads(monkeypatch)
    assert run_flux(args) == 0
    _expect_one_read_per_step(reads)


def test_step_verdict_reads_loss_and_riders_in_one_read(monkeypatch: pytest.MonkeyPatch):
    reads = HostReads(monkeypatch)
    verdict = faults.step_verdict(torch.tensor(0.75), None, 1, torch.tensor([3.0, 0.5, 2.0]))
    assert verdict == faults.StepVerdict(True, 0, 0.75, (3.0, 0.5, 2.0))
    assert faults.step_verdict(torch.tensor(float("nan")), 15, 1).finite is False
    assert faults.step_verdict(torch.tensor(1.0), 15, 1).signal == 15
    assert reads.calls == [LOSS_READ] * 3  # one tolist per verdict, riders included


def test_third_party_statistics_become_one_device_tensor():
    values = loop.as_device_values((3, torch.tensor(0.5), 2.0), torch.device("cpu"))
    assert values.dtype == torch.float32 and values.tolist() == [3.0, 0.5, 2.0]


def _fake_run(device: str, workers: int = 0) -> SimpleNamespace:
    dataset = SimpleNamespace(num_batches_per_epoch=3, latents_in_memory=lambda: False)
    return SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device(device), process_index=0, num_processes=1),
        dataset=dataset,
        config=SimpleNamespace(max_data_loader_n_workers=workers, persistent_data_loader_workers=False),
        progress=SimpleNamespace(seed=0),
    )


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_loader_pins_batches_only_for_cuda(device: str, pinned: bool):
    loader, _ = loop.make_loader(_fake_run(device))
    assert loader.pin_memory is pinned


def test_batch_tensors_move_to_the_device_without_blocking(
    tiny_sd1_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    family = get_family("sd")
    info = family.inspect(tiny_sd1_dir, v2=False, v_parameterization=False)
    bundle = family.load(info, vae_path=None, tokenizer_path=None, dtype=torch.float32)
    batch = {
        "latents": torch.randn(2, 4, 8, 8),
        "masks": torch.ones(2, 1, 64, 64),
        "loss_weights": torch.ones(2),
        "captions": ["sks shape, red", "sks shape, blue"],
    }
    watched = {id(batch[key]): key for key in ("latents", "masks", "loss_weights")}
    moves: list[tuple[str, bool]] = []
    original_to = torch.Tensor.to

    def recording_to(tensor, *args, **kwargs):
        to_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)
        if id(tensor) in watched and to_device:  # dtype-only casts happen on the device
            moves.append((watched[id(tensor)], kwargs.get("non_blocking", False)))
        return original_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    options = StepOptions(
        min_timestep=0,
        max_timestep=1000,
        clip_skip=None,
        max_token_length=None,
        train_text_encoder=False,
        weight_dtype=torch.float32,
    )
    loss = diffusion_loss(family, bundle, batch, options, torch.device("cpu"))
    assert loss.ndim == 0
    assert sorted(moves) == [("latents", True), ("loss_weights", True), ("masks", True)]


class _Node:
    pass


def test_startup_gc_holds_off_full_collections_then_freezes_before_training():
    thresholds = gc.get_threshold()
    gc.disable()  # no automatic collection until `paused()`
    cycle = _Node()
    cycle.self = cycle  # a previous run's garbage in a reference cycle: only the collector frees it
    alive = weakref.ref(cycle)
    del cycle
    assert alive() is not None
    gc.enable()
    try:
        with startup_gc.paused():
            assert alive() is None  # collected before this run loads anything
            assert gc.get_threshold() == (*thresholds[:2], startup_gc.NO_FULL_COLLECTIONS)
            assert gc.isenabled()  # young collections go on
            startup_gc.before_training()
            assert gc.get_threshold() == thresholds
            assert gc.get_freeze_count() > 0  # start-up objects are skipped by later full collections
        assert gc.get_freeze_count() == 0
        startup_gc.before_training()  # outside a pause (library callers): leaves the collector alone
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == thresholds
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)

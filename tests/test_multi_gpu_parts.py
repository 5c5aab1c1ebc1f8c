"""The pieces of data parallel training, without a launcher: caches split over two "processes" (threads with
an all-gather), VAE sampling seeded per encoding batch, per-sample noise seeds, DDP gradient sync under
gradient accumulation (two gloo processes), and the launch checks."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_data_cache import PoolEncoder, make_group

from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetSpec, SubsetSpec
from library.data.latent_cache import cache_latents
from library.data.sharing import Share
from library.data.text_cache import cache_text_outputs
from library.errors import UserError
from library.training.launch import accelerator_options, check_world, launch_problems
from library.training.noise import NoiseOptions, keyed_draws


def in_two_threads(work: Callable[[Share], Any]) -> list[Any]:
    """`work(share)` for ranks 0 and 1 at once, their all-gathers meeting at a barrier."""
    barrier, slots, results = threading.Barrier(2, timeout=30), [None, None], [None, None]

    def run(rank: int) -> None:
        def all_gather(value: Any) -> list[Any]:
            slots[rank] = value
            barrier.wait()
            gathered = list(slots)
            barrier.wait()  # nobody overwrites a slot before both have read
            return gathered

        results[rank] = work(Share(rank=rank, world=2, all_gather=all_gather))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def latents_of(group) -> list[torch.Tensor]:
    return [group.load_batch(0, s)["latents"] for s in range(group.num_batches_per_epoch)]


@pytest.mark.parametrize("to_disk", [False, True])
def test_latent_cache_split_over_two_processes_serves_every_image(tmp_path: Path, to_disk: bool) -> None:
    groups = [make_group(tmp_path / "shared", flip_aug=True) for _ in range(2)]  # one dataset folder

    def cache(share: Share):
        return cache_latents(
            groups[share.rank], PoolEncoder(), cache_id="v", to_disk=to_disk, batch_size=1,
            show_progress=False, share=share,
        )  # fmt: skip

    reports = in_two_threads(cache)
    # Three buckets, three encoding batches: rank 0 takes batches 0 and 2, rank 1 batch 1.
    assert [(r.encoded, r.encoded_here) for r in reports] == [(3, 2), (3, 1)]
    alone = make_group(tmp_path / "alone", flip_aug=True)
    report = cache_latents(
        alone, PoolEncoder(), cache_id="v", to_disk=to_disk, batch_size=1, show_progress=False
    )
    assert str(report) == f"latent cache ({'disk' if to_disk else 'RAM'}): 3 encoded, 0 reused"
    assert str(reports[1]).startswith(f"latent cache ({'disk' if to_disk else 'RAM'}): 3 encoded (1 by this")
    for group in groups:
        assert group.latents_in_memory() is not to_disk
        for got, want in zip(latents_of(group), latents_of(alone), strict=True):
            assert torch.equal(got, want)
    if to_disk:
        assert len(list((tmp_path / "shared" / "img").glob("*.npz"))) == 3


def sampling_encoder(pixels: torch.Tensor) -> torch.Tensor:
    """Like a VAE's latent_dist.sample(): a draw from the global RNG."""
    mean = F.avg_pool2d(pixels, 8)[:, [0, 1, 2, 0]]
    return mean + torch.randn_like(mean)


def test_sampled_latents_depend_on_the_images_not_on_the_rng_before(tmp_path: Path) -> None:
    first, second, unseeded = (make_group(tmp_path / name) for name in ("a", "b", "c"))
    cache_latents(
        first, sampling_encoder, cache_id="v", to_disk=False, batch_size=1, seed=5, show_progress=False
    )
    torch.randn(100)  # another process would have drawn something else before caching
    state = torch.get_rng_state()
    cache_latents(
        second, sampling_encoder, cache_id="v", to_disk=False, batch_size=1, seed=5, show_progress=False
    )
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is left as it was
    cache_latents(unseeded, sampling_encoder, cache_id="v", to_disk=False, batch_size=1, show_progress=False)
    for a, b, c in zip(latents_of(first), latents_of(second), latents_of(unseeded), strict=True):
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_text_cache_split_over_two_processes(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("wide", "square", "tall"):
        (folder / f"{name}.caption").write_text(f"a {name} thing")
    groups = [make_group(tmp_path) for _ in range(2)]

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        return {"hidden": torch.tensor([[float(len(c)), float(ord(c[2]))] for c in captions])}

    def cache(share: Share):
        return cache_text_outputs(
            [groups[share.rank]],
            encode,
            cache_id="t",
            to_disk=True,
            batch_size=1,
            show_progress=False,
            share=share,
        )

    caches = in_two_threads(cache)
    assert [c.report.encoded_here for c in caches] == [2, 1]
    assert (
        str(caches[0].report)
        == "text-encoder outputs (disk): 3 encoded (2 captions by this process), 0 reused"
    )
    want = {f"a {n} thing": encode([f"a {n} thing"])["hidden"][0] for n in ("wide", "square", "tall")}
    for c in caches:
        assert sorted(c.entries) == sorted(want)
        assert all(torch.equal(c.entries[k]["hidden"], v) for k, v in want.items())
    assert len(list(folder.glob("*_te_outputs.npz"))) == 3  # each written once, by one of the two


def epoch_samples(batch_size: int, root: Path) -> set[tuple[str, int]]:
    """(image, noise seed) of every sample of epoch 0."""
    subset = SubsetSpec(root, 2, False, "thing", ".caption", False, ",", 0, None, None, False, False)
    group = build_dataset_group(
        [DatasetSpec((128, 128), batch_size, True, 64, 256, 64, False, (subset,))], seed=3
    )
    return {
        (Path(path).name, seed)
        for step in range(group.num_batches_per_epoch)
        for batch in [group.load_batch(0, step)]
        for path, seed in zip(batch["image_paths"], batch["noise_seeds"], strict=True)
    }


def test_noise_seeds_name_the_sample_not_its_batch(tmp_path: Path) -> None:
    make_group(tmp_path)  # three images, two repeats each
    by_batch_1, by_batch_2 = epoch_samples(1, tmp_path / "img"), epoch_samples(2, tmp_path / "img")
    assert by_batch_1 == by_batch_2
    assert len({seed for _, seed in by_batch_1}) == 6  # each repeat its own


def test_keyed_draws_do_not_depend_on_the_batch() -> None:
    latents = torch.randn(2, 4, 8, 8)
    options = NoiseOptions(noise_offset=0.1, noise_offset_random_strength=True, ip_noise_gamma=0.1)

    def timesteps(one: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 1000, (one.shape[0],), generator=generator)

    noise, t, perturbed = keyed_draws([11, 12], latents, options, timesteps)
    parts = [keyed_draws([seed], latents[i : i + 1], options, timesteps) for i, seed in enumerate([11, 12])]
    assert torch.equal(noise, torch.cat([p[0] for p in parts])) and torch.equal(
        t, torch.cat([p[1] for p in parts])
    )
    assert torch.equal(perturbed, torch.cat([p[2] for p in parts]))
    assert not torch.equal(noise[0], noise[1])


def _ddp_worker(rank: int, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    from accelerate import Accelerator

    from library.training.ddp import data_parallel_forward, gradient_sync

    acc = Accelerator(cpu=True)  # gloo, also on a machine with GPUs
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's trainable ones
    network = torch.nn.Linear(3, 1, bias=False)
    network.frozen = torch.nn.Parameter(torch.full((2,), float(rank)), requires_grad=False)

    def loss_fn(family, bundle, batch, options, device, autocast) -> torch.Tensor:
        return (network(batch["x"]) ** 2).sum()

    forward, _ = data_parallel_forward(acc, network, None, None, None, loss_fn)
    grads = []
    for micro, sync in enumerate((False, True)):
        with gradient_sync(acc, forward, sync):
            acc.backward(forward({"x": torch.full((1, 3), float(1 + rank + 2 * micro))}))
        grads.append(network.weight.grad.clone())
    results[rank] = (type(forward).__name__, network.weight.detach().clone(), network.frozen.clone(), grads)
    torch.distributed.destroy_process_group()


def test_ddp_averages_gradients_only_on_the_last_micro_step() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_ddp_worker, args=(port, results), nprocs=2, join=True)
    (name0, w0, frozen0, grads0), (name1, w1, frozen1, grads1) = results[0], results[1]
    assert name0 == name1 == "DistributedDataParallel"
    assert torch.equal(w0, w1)  # rank 0's weights, broadcast
    assert frozen0.tolist() == [0.0, 0.0] and frozen1.tolist() == [1.0, 1.0]  # frozen ones untouched
    w = w0[0]
    local = [2 * (w @ torch.full((3,), x)) * torch.full((3,), x) for x in (1.0, 2.0, 3.0, 4.0)]
    assert torch.allclose(grads0[0][0], local[0]) and torch.allclose(grads1[0][0], local[1])  # no sync yet
    average = (local[0] + local[2] + local[1] + local[3]) / 2  # each rank's sum of micro-steps, averaged
    assert torch.allclose(grads0[1][0], average) and torch.allclose(grads1[1][0], average)


def test_launch_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="launcher started 2 processes .* group of 1"):
        check_world(1)
    check_world(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_options() == {"cpu": True}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert accelerator_options() == {}


def test_deepspeed_refuses_what_it_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = dict(save_state=True, resume=False, fused=True, schedule_free=False, stochastic_rounding=False)
    assert launch_problems(**flags) == []  # not a DeepSpeed launch
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_options() == {}  # cpu=True would replace DeepSpeed by DDP
    problems = launch_problems(**flags)
    assert [p.split(":")[0] for p in problems] == [
        "--save_state/--resume with DeepSpeed",
        "--fused_backward_pass/--fused_optimizer_groups with DeepSpeed",
    ]
    assert "launch with --multi_gpu (DDP) for resumable runs" in problems[0]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launch_problems(**flags)[0].startswith("FSDP launches are not supported")

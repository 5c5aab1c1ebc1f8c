"""Benchmark: train_network.py against a bare training loop on the same model, LoRA and batch shapes.

Measures
- steady-state seconds per optimizer step (median over the timed steps, after warm-up), trainer vs bare loop;
- time to first step: from launching `python train_network.py` to the end of its first optimizer step.

The bare loop is the floor: the same UNet/text encoder/LoRA layers, fixed latents and token ids already on the
device, forward + loss + backward + optimizer step, nothing else.

    python bench/bench_train.py [--size tiny|small] [--steps 60] [--batch 4] [--resolution 64]

Target: trainer steady-state step <= 1.05x the bare loop. Results print as a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_model(folder: Path) -> Path:
    from library.families.tiny import build_tiny_sd, save_diffusers_folder

    if not (folder / "model_index.json").exists():
        save_diffusers_folder(build_tiny_sd("sd1", seed=0), folder)
    return folder


def make_dataset(folder: Path, n: int, resolution: int) -> Path:
    from PIL import Image

    sub = folder / "1_sks shape"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (resolution, resolution), ((37 * i) % 255, 90, 200)).save(sub / f"{i:03d}.png")
        (sub / f"{i:03d}.caption").write_text(f"sks shape, image {i}")
    return folder


def trainer_args(
    model: Path, data: Path, out: Path, steps: int, batch: int, resolution: int, times: Path
) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--resolution",
        str(resolution),
        "--output_dir",
        str(out),
        "--output_name",
        "bench",
        "--overwrite",
        "--network_module",
        "networks.lora",
        "--network_dim",
        "8",
        "--learning_rate",
        "1e-4",
        "--max_train_steps",
        str(steps),
        "--train_batch_size",
        str(batch),
        "--cache_latents",
        "--seed",
        "0",
        "--max_data_loader_n_workers",
        "0",
    ]


def run_trainer(args: list[str], times: Path, script: str = "train_network.py") -> tuple[list[float], float]:
    """Launch the real `script`; returns per-step end times (wall clock) and the launch time."""
    env = {**os.environ, "LORATRAIN_STEP_TIMES": str(times), "PYTHONPATH": str(ROOT)}
    launched = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed:\n{proc.stderr[-3000:]}")
    data = json.loads(times.read_text())
    return data["step_end_wall"], launched


def bare_loop(model: Path, steps: int, batch: int, resolution: int) -> list[float]:
    """The floor: identical model/LoRA/batch shapes, nothing but the math."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    import networks.lora as lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model / "unet").requires_grad_(False)
    te = CLIPTextModel.from_pretrained(model / "text_encoder").requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    net = lora.create_network(1.0, 8, 1.0, None, te, unet)
    net.apply_to(te, unet, True, True)
    groups, _ = net.prepare_optimizer_params(None, None, 1e-4)
    opt = torch.optim.AdamW(groups, lr=1e-4)
    latent = resolution // 8
    latents = torch.randn(batch, 4, latent, latent)
    ids = tok(
        [f"sks shape, image {i}" for i in range(batch)],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    alphas = torch.linspace(0.99, 0.01, 1000)
    ends = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        cond = te(ids).last_hidden_state
        pred = unet(noisy, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def per_step(ends: list[float], warmup: int) -> float:
    deltas = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :], strict=False)]
    return statistics.median(deltas)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loratrain_bench_"))
    model = make_model(work / "model")
    data = make_dataset(work / "data", n=args.batch * 4, resolution=args.resolution)
    times = work / "times.json"
    ends, launched = run_trainer(
        trainer_args(model, data, work / "out", args.steps, args.batch, args.resolution, times), times
    )
    trainer_step = per_step(ends, args.warmup)
    first_step = ends[0] - launched
    bare_step = per_step(bare_loop(model, args.steps, args.batch, args.resolution), args.warmup)
    result = {
        "trainer_step_s": round(trainer_step, 5),
        "bare_step_s": round(bare_step, 5),
        "ratio": round(trainer_step / bare_step, 3),
        "time_to_first_step_s": round(first_step, 2),
        "steps": args.steps,
        "batch": args.batch,
        "resolution": args.resolution,
    }
    print(
        f"steady-state step: trainer {trainer_step * 1000:.1f} ms, bare loop {bare_step * 1000:.1f} ms, "
        f"ratio {result['ratio']:.3f} (target <= 1.05)"
    )
    print(f"time to first step (process launch -> first optimizer step done): {first_step:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

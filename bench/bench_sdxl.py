"""Benchmark SDXL: sdxl_train_network.py against a bare loop, and the peak memory of one real-size UNet step.

Loop mode (default): an SDXL-topology UNet (3 levels, DownBlock2D + 2 cross-attention levels, 2 resnets per
level, transformer depth 1/2/10, text_time conditioning) at reduced width (`--channels`), with the tiny SDXL
text encoders, saved as a diffusers SDXL folder. Measures, as bench_train.py does for SD 1.x,
- steady-state seconds per optimizer step (median after warm-up), trainer vs bare loop;
- time to first step: from launching `python sdxl_train_network.py` to the end of its first optimizer step.
The bare loop is the floor: the same UNet/text encoders/LoRA (both text encoders' penultimate states
concatenated, the pooled output of encoder 2 and the size `time_ids`, as the SDXL family predicts), fixed
latents and token ids, forward + loss + backward + clip + AdamW step, nothing else.

    python bench/bench_sdxl.py [--channels 64 128 256] [--steps 30] [--batch 2] [--resolution 128]
        [--repeats 1]

`--real_unet_rss`: one training step of the real-size SDXL UNet (random weights) in a fresh process: bf16
weights built without a float32 copy, gradient checkpointing, LoRA rank 16 on the UNet, autocast bf16,
latents 128x128 (1024x1024 images), batch 1, forward + loss + backward + AdamW step. Reports RSS with the
weights loaded, peak RSS (ru_maxrss) and the step's seconds.

    python bench/bench_sdxl.py --real_unet_rss

Target (loop mode): trainer steady-state step <= 1.05x the bare loop. Results print as a table line and a
JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import make_dataset, per_step, run_trainer, trainer_args  # noqa: E402

REAL_LORA_RANK = 16
# Real SDXL UNet: 2.57e9 parameters -> ~4.8 GiB in bf16; the step adds activations and LoRA/AdamW state.
REAL_UNET_NEEDS_GIB = 12


def make_sdxl_model(folder: Path, channels: tuple[int, int, int]) -> Path:
    """A diffusers SDXL folder: real block structure and transformer depth (1, 2, 10) at width `channels`."""
    import torch
    from diffusers import UNet2DConditionModel

    from library.families.tiny_sdxl import build_tiny_sdxl, save_diffusers_folder, unet_config

    if not (folder / "model_index.json").exists():
        model = build_tiny_sdxl(seed=0, tokenizer_dir=folder / "tokenizer")
        torch.manual_seed(0)
        model.unet = UNet2DConditionModel(**unet_config(channels, layers=(1, 2, 10))).eval()
        save_diffusers_folder(model, folder)
    return folder


def _token_ids(tokenizer, captions: list[str]):
    return tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def bare_loop(model: Path, steps: int, batch: int, resolution: int) -> list[float]:
    """The floor: identical model/LoRA/batch shapes and SDXL conditioning, nothing but the math."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import networks.lora as lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model / "unet").requires_grad_(False)
    te1 = CLIPTextModel.from_pretrained(model / "text_encoder").requires_grad_(False)
    te2 = CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2").requires_grad_(False)
    tok1 = CLIPTokenizer.from_pretrained(model / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(model / "tokenizer_2")
    tok2.pad_token = "!"
    net = lora.create_network(1.0, 8, 1.0, None, [te1, te2], unet)
    net.apply_to([te1, te2], unet, True, True)
    groups, _ = net.prepare_optimizer_params(None, None, 1e-4)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-4)
    latent = resolution // 8
    latents = torch.randn(batch, 4, latent, latent)
    captions = [f"sks shape, image {i}" for i in range(batch)]
    ids1, ids2 = _token_ids(tok1, captions), _token_ids(tok2, captions)
    time_ids = torch.tensor(
        [[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32
    )
    alphas = torch.linspace(0.99, 0.01, 1000)
    ends = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        out1 = te1(ids1, output_hidden_states=True)
        out2 = te2(ids2, output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
        pred = unet(noisy, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def loop_mode(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="loratrain_bench_sdxl_"))
    channels = tuple(args.channels)
    model = make_sdxl_model(work / "model", channels)
    data = make_dataset(work / "data", n=args.batch * 4, resolution=args.resolution)
    times = work / "times.json"
    targs = trainer_args(model, data, work / "out", args.steps, args.batch, args.resolution, times)
    trainer_steps, bare_steps, first_steps = [], [], []
    # Alternating runs and keeping each side's fastest makes the ratio robust to other load on a shared box.
    for _ in range(args.repeats):
        ends, launched = run_trainer(targs, times, script="sdxl_train_network.py")
        trainer_steps.append(per_step(ends, args.warmup))
        first_steps.append(ends[0] - launched)
        bare_steps.append(per_step(bare_loop(model, args.steps, args.batch, args.resolution), args.warmup))
    trainer_step, bare_step, first_step = min(trainer_steps), min(bare_steps), min(first_steps)
    result = {
        "trainer_step_s": round(trainer_step, 5),
        "bare_step_s": round(bare_step, 5),
        "ratio": round(trainer_step / bare_step, 3),
        "time_to_first_step_s": round(first_step, 2),
        "trainer_step_s_runs": [round(v, 5) for v in trainer_steps],
        "bare_step_s_runs": [round(v, 5) for v in bare_steps],
        "steps": args.steps,
        "batch": args.batch,
        "resolution": args.resolution,
        "channels": list(channels),
    }
    print(
        f"SDXL topology {channels}: steady-state step: trainer {trainer_step * 1000:.1f} ms, bare loop "
        f"{bare_step * 1000:.1f} ms, ratio {result['ratio']:.3f} (target <= 1.05)"
    )
    print(f"time to first step (process launch -> first optimizer step done): {first_step:.2f} s")
    print(json.dumps(result))


def _vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def random_unet(config: dict, dtype):
    """A UNet2DConditionModel of `config` in `dtype`, never materialised in float32 unless asked: meta ->
    dtype -> filled in place (norm weights 1, biases 0, other weights N(0, 0.02): small weights keep the
    activations of many random transformer blocks finite in bf16)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for buffer in unet.buffers():
            buffer.zero_()
    return unet.requires_grad_(False)


def build_real_unet():
    """The real-size SDXL UNet in bf16."""
    import torch

    from library.families.tiny_sdxl import REAL_UNET_CONFIG

    return random_unet(REAL_UNET_CONFIG, torch.bfloat16)


def real_unet_step() -> dict:
    """One real-size SDXL training step in this process; call in a fresh one (see `real_unet_rss`)."""
    import torch

    import networks.lora as lora

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = build_real_unet()
    unet.enable_gradient_checkpointing()
    unet.train()  # diffusers checkpoints only in train mode
    net = lora.create_network(1.0, REAL_LORA_RANK, 1.0, None, None, unet)
    net.apply_to(None, unet, False, True)
    groups, _ = net.prepare_optimizer_params(None, None, 1e-4)
    opt = torch.optim.AdamW(groups, lr=1e-4)
    n_base = sum(p.numel() for p in unet.parameters())
    n_lora = sum(p.numel() for g in groups for p in g["params"])
    latents = torch.randn(1, 4, 128, 128)
    noise = torch.randn_like(latents)
    context = torch.randn(1, 77, 2048)
    pooled = torch.randn(1, 1280)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    timesteps = torch.tensor([500])
    built = time.perf_counter() - start
    rss_before = _vm_rss_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        noisy = (0.7 * latents + 0.7 * noise).to(torch.bfloat16)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        pred = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "unet_params": n_base,
        "lora_params": n_lora,
        "build_s": round(built, 1),
        "rss_before_step_gib": round(rss_before / 1024**2, 2),
        "peak_rss_before_step_gib": round(peak_before / 1024**2, 2),
        "peak_rss_gib": round(peak / 1024**2, 2),
        "step_s": round(step_s, 1),
        "loss": float(loss),
        "compute": "bf16 weights, fp32 LoRA, torch.autocast(cpu, bfloat16)",
    }


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def real_unet_rss() -> None:
    available = _mem_available_gib()
    if available < REAL_UNET_NEEDS_GIB:
        raise SystemExit(
            f"only {available:.1f} GiB RAM available; the real-size SDXL UNet step needs about "
            f"{REAL_UNET_NEEDS_GIB} GiB: not run (it would swap or be killed)"
        )
    proc = subprocess.run(
        [sys.executable, __file__, "--_real_unet_child"], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise SystemExit(f"real-size UNet step failed{killed}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"real SDXL UNet ({result['unet_params'] / 1e9:.2f}B params, LoRA rank {REAL_LORA_RANK}: "
        f"{result['lora_params'] / 1e6:.1f}M), 1024x1024, batch 1, bf16 + gradient checkpointing: "
        f"RSS before step {result['rss_before_step_gib']:.2f} GiB, peak {result['peak_rss_gib']:.2f} GiB, "
        f"step {result['step_s']:.1f} s"
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, nargs=3, default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate trainer/bare runs; report the fastest"
    )
    parser.add_argument("--real_unet_rss", action="store_true", help="peak RSS of one real-size UNet step")
    parser.add_argument("--_real_unet_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._real_unet_child:
        print(json.dumps(real_unet_step()))
    elif args.real_unet_rss:
        real_unet_rss()
    else:
        loop_mode(args)


if __name__ == "__main__":
    main()

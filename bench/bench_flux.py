"""Benchmark FLUX.1: flux_train_network.py against a bare loop, and peak RSS while loading and training.

Loop mode (default): a reduced FLUX.1 transformer with the real block types (double and single stream
blocks, guidance embedder, 2x2-packed 16-channel latents) but fewer, narrower blocks (`--double`,
`--single`, `--heads` x `--head_dim`), the tiny CLIP-L/T5 and autoencoder, written as BFL single files.
The trainer runs with cached latents and cached text encoder outputs (`--cache_text_encoder_outputs
--network_train_unet_only`), `--model_prediction_type raw`, a fixed `--t5xxl_max_token_length`; the bare loop
is the floor: the same transformer and LoRA (networks.lora on the transformer only), packed latents + ids +
guidance + pooled + T5 sequence of the same shapes, rectified-flow loss (target noise - latents), backward,
clip, AdamW step, nothing else. Reports steady-state seconds per step (median after warm-up) for both, the
ratio, time to first step (launch -> first optimizer step done) and the trainer's peak RSS (ru_maxrss).

    python bench/bench_flux.py [--double 3] [--single 6] [--heads 6] [--head_dim 64] [--steps 30]
        [--batch 2] [--resolution 256] [--repeats 1] [--profile]

`--profile`: one extra trainer run in process under cProfile; prints the top functions by cumulative time.

`--load_rss`: peak RSS of loading a large transformer file (bf16, real width 3072, `--load_double` double and
`--load_single` single blocks; ~1.3 GB by default), each load in a fresh process: the family's path
(`read_state_dict` + `flux_checkpoint.build_transformer`, bf16 and float32) vs a naive load (safetensors
`load_file` + `FluxTransformer2DModel(**config)` + `load_state_dict` + `.to(bfloat16)`).

    python bench/bench_flux.py --load_rss

Target (loop mode): trainer steady-state step <= 1.05x the bare loop. Results print as table lines and JSON.
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

GUIDANCE = 3.5  # the trainer's default --guidance_scale
LOAD_MODES = ("family_bf16", "family_fp32", "naive")


def make_flux_model(
    folder: Path, double: int, single: int, heads: int, head_dim: int
) -> tuple[dict[str, Path], list]:
    """BFL single files (transformer, ae, clip_l, t5xxl) + tokenizer folders, the transformer reduced; and the
    text encoders [CLIP-L, T5] (the bare loop binds its network to them as the trainer does)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from library.families.tiny_flux import build_tiny_flux, transformer_config, write_single_files

    tokenizers = {"clip_tokenizer": folder / "clip_tokenizer", "t5_tokenizer": folder / "t5_tokenizer"}
    model = build_tiny_flux(0, tokenizers["clip_tokenizer"], t5_tokenizer_dir=tokenizers["t5_tokenizer"])
    torch.manual_seed(0)
    config = transformer_config(double=double, single=single, heads=heads, head_dim=head_dim)
    model.transformer = FluxTransformer2DModel(**config).eval()
    return write_single_files(model, folder) | tokenizers, [model.clip_l, model.t5]


def flux_trainer_args(files: dict[str, Path], data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    base = trainer_args(
        files["transformer"], data, out, args.steps, args.batch, args.resolution, out / "times.json"
    )
    return base + [
        *("--clip_l", str(files["clip_l"]), "--t5xxl", str(files["t5xxl"]), "--ae", str(files["ae"])),
        *("--tokenizer_path", str(files["clip_tokenizer"])),
        *("--tokenizer_2_path", str(files["t5_tokenizer"])),
        "--cache_text_encoder_outputs",
        "--network_train_unet_only",
        *("--model_prediction_type", "raw"),
        *("--t5xxl_max_token_length", str(args.t5_length)),
    ]


def bare_loop(
    files: dict[str, Path], text_encoders: list, args: argparse.Namespace
) -> tuple[list[float], int]:
    """The floor: the same transformer, LoRA and tensor shapes, nothing but the math. Returns per-step end
    times and the number of LoRA parameters trained."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    import networks.lora as lora
    from library.families.flux_checkpoint import bfl_to_diffusers, transformer_config_from_shapes
    from library.families.flux_math import image_ids, pack
    from library.families.tiny_flux import T5_DIM

    torch.manual_seed(0)
    sd = load_file(str(files["transformer"]))
    config = transformer_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    transformer = FluxTransformer2DModel(**config)
    transformer.load_state_dict(bfl_to_diffusers(sd))
    transformer.requires_grad_(False).eval()
    # The text encoders' LoRA is dropped (--network_train_unet_only); they only bind the network.
    net = lora.create_network(1.0, 8, 1.0, None, text_encoders, transformer)
    net.apply_to(text_encoders, transformer, apply_text_encoder=False, apply_unet=True)
    groups, _ = net.prepare_optimizer_params(None, None, 1e-4)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-4)
    b, h = args.batch, args.resolution // 8
    latents = torch.randn(b, 16, h, h)
    context = torch.randn(b, args.t5_length, T5_DIM)
    pooled = torch.randn(b, config["pooled_projection_dim"])
    img_ids, txt_ids = image_ids(h, h, latents.device, torch.float32), torch.zeros(args.t5_length, 3)
    guidance = torch.full((b,), GUIDANCE)
    ends = []
    for _ in range(args.steps):
        noise = torch.randn_like(latents)
        sigmas = torch.rand(b)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        pred = transformer(
            hidden_states=pack(noisy),
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=sigmas,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        # The packed target holds the same elements as the unpacked one, so the MSE is the same.
        loss = torch.nn.functional.mse_loss(pred, pack(noise - latents))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends, sum(p.numel() for p in params)


def _lora_params(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(v.numel() for k, v in load_file(str(path)).items() if not k.endswith(".alpha"))


def profile_trainer(targs: list[str], top: int = 25) -> None:
    """One trainer run in a fresh process under cProfile; prints the top functions by cumulative time."""
    code = (
        "import cProfile, pstats, sys\n"
        "from library.entry import main\n"
        f"argv = {targs!r}\n"
        "prof = cProfile.Profile()\n"
        "prof.runcall(main, argv, prog='flux_train_network.py', family='flux', description='bench')\n"
        f"pstats.Stats(prof).sort_stats('cumulative').print_stats({top})\n"
        f"pstats.Stats(prof).sort_stats('tottime').print_stats({top})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"profiled trainer failed:\n{proc.stderr[-3000:]}")


def loop_mode(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="loratrain_bench_flux_"))
    files, text_encoders = make_flux_model(
        work / "model", args.double, args.single, args.heads, args.head_dim
    )
    data = make_dataset(work / "data", n=args.batch * 4, resolution=args.resolution)
    out = work / "out"
    out.mkdir()
    targs = flux_trainer_args(files, data, out, args)
    trainer_steps, bare_steps, first_steps = [], [], []
    # Alternating runs and keeping each side's fastest makes the ratio robust to other load on a shared box.
    for _ in range(args.repeats):
        ends, launched = run_trainer(targs, out / "times.json", script="flux_train_network.py")
        trainer_steps.append(per_step(ends, args.warmup))
        first_steps.append(ends[0] - launched)
        ends, bare_lora = bare_loop(files, text_encoders, args)
        bare_steps.append(per_step(ends, args.warmup))
    trainer_lora = _lora_params(out / "bench.safetensors")
    if trainer_lora != bare_lora:
        raise SystemExit(
            f"not the same network: trainer {trainer_lora} LoRA parameters, bare loop {bare_lora}"
        )
    # Only trainer runs are child processes here, so this is the largest trainer's peak.
    trainer_peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # An upper bound for the bare loop: this process also holds the tiny model that wrote the files.
    bare_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer_step, bare_step, first_step = min(trainer_steps), min(bare_steps), min(first_steps)
    result = {
        "trainer_step_s": round(trainer_step, 5),
        "bare_step_s": round(bare_step, 5),
        "ratio": round(trainer_step / bare_step, 3),
        "time_to_first_step_s": round(first_step, 2),
        "trainer_peak_rss_mib": round(trainer_peak_kib / 1024),
        "bare_process_peak_rss_mib": round(bare_peak_kib / 1024),
        "trainer_step_s_runs": [round(v, 5) for v in trainer_steps],
        "bare_step_s_runs": [round(v, 5) for v in bare_steps],
        "lora_params": bare_lora,
        "transformer_mib": round(files["transformer"].stat().st_size / 2**20, 1),
        "steps": args.steps,
        "batch": args.batch,
        "resolution": args.resolution,
        "t5_length": args.t5_length,
        "blocks": [args.double, args.single],
        "inner": args.heads * args.head_dim,
    }
    print(
        f"FLUX {args.double} double / {args.single} single blocks, width {args.heads * args.head_dim}: "
        f"steady-state step: trainer {trainer_step * 1000:.1f} ms, bare loop {bare_step * 1000:.1f} ms, "
        f"ratio {result['ratio']:.3f} (target <= 1.05)"
    )
    print(f"time to first step (process launch -> first optimizer step done): {first_step:.2f} s")
    print(
        f"peak RSS (ru_maxrss): trainer process {trainer_peak_kib / 1024:.0f} MiB, bench process with the "
        f"bare loop {bare_peak_kib / 1024:.0f} MiB"
    )
    print(json.dumps(result))
    if args.profile:
        profile_trainer(targs)


def _vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_big_transformer(path: Path, double: int, single: int) -> None:
    """A BFL file of the real-width transformer with `double`/`single` blocks, bf16, random; written without a
    float32 copy (the shapes come from a meta-device model)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from library.families.flux_checkpoint import diffusers_to_bfl
    from library.families.tiny_flux import REAL_TRANSFORMER_CONFIG

    with init_empty_weights():
        model = FluxTransformer2DModel(
            **{**REAL_TRANSFORMER_CONFIG, "num_layers": double, "num_single_layers": single}
        )
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, meta in diffusers_to_bfl(model.state_dict()).items():
        tensor = torch.empty(meta.shape, dtype=torch.bfloat16)
        if key.endswith(".scale"):
            tensor.fill_(1.0)
        elif key.endswith(".bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[key] = tensor
    save_file(state, str(path))


def load_child(mode: str, path: Path) -> dict:
    """Load `path` one way in this (fresh) process; RSS before, after (model alive) and peak, in KiB."""
    import gc

    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from library.families import flux_checkpoint as fc
    from library.families.sd_checkpoint import read_state_dict

    gc.collect()
    before, peak_before = _vm_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "naive":
        sd = load_file(str(path))
        model = FluxTransformer2DModel(
            **fc.transformer_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})
        )
        model.load_state_dict(fc.bfl_to_diffusers(sd))
        model.to(torch.bfloat16)
        del sd
    else:
        dtype = torch.bfloat16 if mode == "family_bf16" else torch.float32
        model = fc.build_transformer(read_state_dict(path), path, dtype)
    gc.collect()
    seconds = time.perf_counter() - start
    after, peak_after = _vm_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Memory-mapped weights are read (become resident) on first use: touch each one as a forward would.
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    return {
        "mode": mode,
        "rss_before_kib": before,
        "peak_before_kib": peak_before,
        "rss_after_kib": after,
        "peak_after_kib": peak_after,
        "rss_touched_kib": _vm_rss_kib(),
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "load_s": round(seconds, 2),
    }


def _child(*flags: str) -> str:
    proc = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise SystemExit(f"{' '.join(flags)} failed{killed}:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def load_rss(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="loratrain_bench_flux_load_"))
    path = work / "flux1-big.safetensors"
    _child(
        "--_write_big",
        str(path),
        "--load_double",
        str(args.load_double),
        "--load_single",
        str(args.load_single),
    )
    file_mib = path.stat().st_size / 2**20
    results = []
    for mode in LOAD_MODES:
        r = json.loads(_child("--_load_child", mode, str(path)))
        mib = {k: (r[f"{k}_kib"] - r["rss_before_kib"]) / 1024 for k in ("rss_after", "rss_touched", "peak")}
        r |= {f"{k}_rise_mib": round(v) for k, v in mib.items()} | {"file_mib": round(file_mib)}
        results.append(r)
        print(
            f"{mode:12s} file {file_mib:.0f} MiB, params {r['param_bytes'] / 2**20:.0f} MiB: RSS "
            f"+{mib['rss_after']:.0f} MiB after load, +{mib['rss_touched']:.0f} MiB with every weight read, "
            f"peak +{mib['peak']:.0f} MiB ({mib['peak'] / file_mib:.2f}x file), load {r['load_s']:.1f} s"
        )
    print(json.dumps({"load_rss": results, "blocks": [args.load_double, args.load_single]}))
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--double", type=int, default=3, help="double stream blocks")
    parser.add_argument("--single", type=int, default=6, help="single stream blocks")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--t5_length", type=int, default=64, help="--t5xxl_max_token_length")
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate trainer/bare runs; report the fastest"
    )
    parser.add_argument("--profile", action="store_true", help="also profile one trainer run (cProfile)")
    parser.add_argument("--load_rss", action="store_true", help="peak RSS while loading a large transformer")
    parser.add_argument("--load_double", type=int, default=1, help="double blocks of the --load_rss file")
    parser.add_argument("--load_single", type=int, default=2, help="single blocks of the --load_rss file")
    parser.add_argument("--_write_big", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_load_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write_big:
        write_big_transformer(args._write_big, args.load_double, args.load_single)
    elif args._load_child:
        print(json.dumps(load_child(args._load_child[0], Path(args._load_child[1]))))
    elif args.load_rss:
        load_rss(args)
    else:
        loop_mode(args)


if __name__ == "__main__":
    main()

"""Peak RSS of one real-size SD1.5 UNet training step (random weights) under each memory trick, on the CPU.

Five settings, each in a fresh process (so one setting's allocator state cannot lower or raise the next):
  a  fp32 weights, no gradient checkpointing, fp32 compute;
  b  bf16 weights + gradient checkpointing, under torch.autocast("cpu", bfloat16);
  c  b + fp8 base (library.memory.fp8.store_fp8: frozen Linear weights as float8_e4m3fn, before the LoRA);
  d  c + fused backward (library.training.fused: AdamW steps each LoRA tensor inside backward);
  e  b + int8 base (library.memory.int8.quantize_int8: frozen Linear weights as int8 + per-channel scales).
The UNet is built on the meta device and materialised in its target dtype (no float32 copy for b-e), LoRA
rank 16 on the UNet only, context [1, 77, 768], batch 1, forward + MSE loss + backward + AdamW step.

Reported per setting: RSS with everything built (VmRSS before the step), the step's own peak (VmHWM after
resetting it through /proc/self/clear_refs just before the step: the build's transient peak, e.g. bf16
weights before fp8 conversion, does not count), the process peak (ru_maxrss) and the step's seconds.

    python bench/bench_sd_memory.py [--resolution 512] [--settings a b c d] [--malloc_trim]

After fp8/int8 conversion the bench returns glibc's freed heap to the OS, as the trainer does
(library/memory/host.py): without it, glibc keeps the converted layers' wider copies and RSS before the step
does not show the saving. --malloc_trim trims after every setting's build too.

Prints a table and a JSON line, then the memory model's expected peak (library/memory/estimate.py, what
--estimate_memory computes, here with the CPU's autocast op lists and glibc's retention term) next to each
measured step peak less the process baseline (RSS after the imports, before the model is built), and exits
non-zero when any setting is off by more than 15%.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sdxl import _mem_available_gib, _vm_rss_kib, random_unet  # noqa: E402

LORA_RANK = 16
# SD1.5's UNet: diffusers UNet2DConditionModel defaults (block_out_channels 320/640/1280/1280, 2 layers per
# block, head dim 8) with CLIP-L's 768-wide context.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
}
SETTINGS = {
    "a": "fp32 weights, no checkpointing",
    "b": "bf16 weights + gradient checkpointing",
    "c": "b + fp8 base (Linear weights)",
    "d": "c + fused backward",
    "e": "b + int8 base (Linear weights)",
}
NEEDS_GIB = 10  # fp32 weights (3.2 GiB) + fp32 activations of a 64x64 step without checkpointing


def build_unet(dtype):
    """The SD1.5 UNet in `dtype` (bench_sdxl.random_unet: no float32 copy unless asked)."""
    return random_unet(SD15_UNET_CONFIG, dtype)


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # not permitted: VmHWM then is the process peak
        return False


def step(setting: str, resolution: int, trim: bool = False) -> dict:
    """One training step of `setting` in this process; call in a fresh one (see `run_all`)."""
    import diffusers  # noqa: F401  (imported before the baseline: it is process overhead, not the step's)
    import torch

    import networks.lora as lora
    from library.memory.host import release_freed_host_memory

    baseline = _vm_rss_kib()  # torch, diffusers, the interpreter: what the memory model does not count
    torch.manual_seed(0)
    start = time.perf_counter()
    low = setting != "a"
    unet = build_unet(torch.bfloat16 if low else torch.float32)
    if low:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in train mode
    fp8_layers = 0
    if setting in ("c", "d"):
        from library.memory.fp8 import store_fp8

        fp8_layers = len(store_fp8(unet).modules)  # before the LoRA exists, as the trainer does
    int8_layers = 0
    if setting == "e":
        from library.memory.int8 import quantize_int8

        int8_layers = len(quantize_int8(unet).modules)
    if setting in ("c", "d", "e"):
        release_freed_host_memory()  # as library/training/memory_setup.py does after converting
    net = lora.create_network(1.0, LORA_RANK, 1.0, None, None, unet)
    net.apply_to(None, unet, False, True)
    groups, _ = net.prepare_optimizer_params(None, None, 1e-4)
    opt = torch.optim.AdamW(groups, lr=1e-4)
    if setting == "d":
        from library.training.fused import fuse_optimizer

        opt = fuse_optimizer(opt, per_tensor=True, groups=None, max_grad_norm=0.0)
    bytes_by_dtype: dict[str, int] = {}
    for tensor in [*unet.parameters(), *unet.buffers()]:
        key = str(tensor.dtype).removeprefix("torch.")
        bytes_by_dtype[key] = bytes_by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
    n_lora = sum(p.numel() for g in groups for p in g["params"])
    side = resolution // 8
    latents = torch.randn(1, 4, side, side)
    noise = torch.randn_like(latents)
    context = torch.randn(1, 77, 768)
    timesteps = torch.tensor([500])
    built = time.perf_counter() - start
    trimmed = trim and release_freed_host_memory()
    rss_before = _vm_rss_kib()
    hwm_reset = _reset_hwm()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        noisy = 0.7 * latents + 0.7 * noise
        pred = unet(
            noisy.to(torch.bfloat16) if low else noisy, timesteps, encoder_hidden_states=context
        ).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    return {
        "setting": setting,
        "resolution": resolution,
        "weights_gib_by_dtype": {k: round(v / 1024**3, 3) for k, v in bytes_by_dtype.items()},
        "fp8_linear_layers": fp8_layers,
        "int8_linear_layers": int8_layers,
        "lora_params": n_lora,
        "build_s": round(built, 1),
        "baseline_rss_gib": round(baseline / 1024**2, 3),
        "rss_before_step_gib": round(rss_before / 1024**2, 3),
        "step_peak_rss_gib": round(_vm_hwm_kib() / 1024**2, 3),
        "step_peak_is_process_peak": not hwm_reset,
        "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "step_s": round(step_s, 1),
        "malloc_trim_before_step": trimmed,
        "loss": float(loss),
    }


def estimate(setting: str, resolution: int) -> dict:
    """library.memory.estimate's expected peak for `setting`: a meta-device UNet built the same way, its
    forward + loss counted under the CPU's autocast lists (the bench runs on the CPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    import networks.lora as lora
    from library.memory import estimate as E

    low = setting != "a"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet = unet.to(torch.bfloat16 if low else torch.float32).requires_grad_(False)
    if low:
        unet.enable_gradient_checkpointing()
        unet.train()
    if setting in ("c", "d"):
        from library.memory.fp8 import store_fp8

        store_fp8(unet)
    if setting == "e":
        from library.memory.int8 import quantize_int8

        quantize_int8(unet)
    net = lora.create_network(1.0, LORA_RANK, 1.0, None, None, unet)
    net.apply_to(None, unet, False, True)
    trained = [p for g in net.prepare_optimizer_params(None, None, 1e-4)[0] for p in g["params"]]
    weights = E.module_bytes(unet, exclude=[net])
    net.to("meta")
    side = resolution // 8
    latents = torch.empty(1, 4, side, side, device="meta")
    context = torch.empty(1, 77, 768, device="meta")
    timesteps = torch.empty(1, dtype=torch.long, device="meta")

    def forward_and_loss():
        with E.compute_context("bf16" if low else "no", device_type="cpu"):
            pred = unet(
                latents.to(torch.bfloat16) if low else latents, timesteps, encoder_hidden_states=context
            )
            return torch.nn.functional.mse_loss(pred.sample.float(), latents)

    profile = E.profile_activations(unet, forward_and_loss, skip=trained)
    result = E.estimate_step(
        frozen=[("UNet weights", weights)],
        trained=trained,
        optimizer_type="AdamW",
        profile=profile,
        checkpointing=low,
        fused_groups=0 if setting == "d" else None,
        allocator="cpu",  # measured as the process's RSS: glibc's retained heap counts
    )
    return {name: size / 1024**3 for name, size in result.components} | {"total": result.total / 1024**3}


def run_all(settings: list[str], resolution: int, trim: bool) -> list[dict]:
    available = _mem_available_gib()
    if available < NEEDS_GIB:
        raise SystemExit(f"only {available:.1f} GiB RAM available; needs about {NEEDS_GIB} GiB: not run")
    results = []
    for setting in settings:
        cmd = [sys.executable, __file__, "--_child", setting, "--resolution", str(resolution)]
        cmd += ["--malloc_trim"] if trim else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
            raise SystemExit(f"setting {setting} failed{killed}:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        results[-1]["estimate_gib"] = {k: round(v, 3) for k, v in estimate(setting, resolution).items()}
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress: each takes minutes
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'setting (GiB)':<42} {'weights':>8} {'before':>8} {'step pk':>8} {'proc pk':>8} {'step s':>7}")
    for r in results:
        name = f"{r['setting']} {SETTINGS[r['setting']]}"
        weights = sum(r["weights_gib_by_dtype"].values())
        gibs = (weights, r["rss_before_step_gib"], r["step_peak_rss_gib"], r["process_peak_rss_gib"])
        print(f"{name:<42} " + " ".join(f"{v:>8.3f}" for v in gibs) + f" {r['step_s']:>7.1f}")
    print(json.dumps(results))


TOLERANCE = 0.15


def check_estimates(results: list[dict]) -> bool:
    """The memory model (--estimate_memory) against each measured step peak less the process baseline;
    False when any is off by more than TOLERANCE."""
    print(
        f"{'setting (GiB)':<42} {'estimate':>9} {'measured':>9} {'ratio':>6}  (measured = step peak - baseline)"
    )
    ok = True
    for r in results:
        measured = r["step_peak_rss_gib"] - r["baseline_rss_gib"]
        expected = r["estimate_gib"]["total"]
        ratio = expected / measured
        ok &= abs(ratio - 1) <= TOLERANCE
        flag = "" if abs(ratio - 1) <= TOLERANCE else f"  OFF BY MORE THAN {TOLERANCE:.0%}"
        print(
            f"{r['setting'] + ' ' + SETTINGS[r['setting']]:<42} {expected:>9.3f} {measured:>9.3f} {ratio:>6.2f}{flag}"
        )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=512, help="image side; latents are 1/8 of it")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    parser.add_argument(
        "--malloc_trim",
        action="store_true",
        help="malloc_trim(0) after the build: RSS then counts live tensors, not freed heap glibc kept",
    )
    parser.add_argument("--_child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(step(args._child, args.resolution, args.malloc_trim)))
    else:
        results = run_all(args.settings, args.resolution, args.malloc_trim)
        print_table(results)
        if not check_estimates(results):
            raise SystemExit(f"memory estimate off by more than {TOLERANCE:.0%} (see the table above)")


if __name__ == "__main__":
    main()

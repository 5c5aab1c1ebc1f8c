"""Data parallel training on CPU (gloo) through `accelerate launch --multi_gpu --num_processes 2`.

2 processes x batch 1 must train the LoRA that 1 process x batch 2 trains: the same samples per step, each
with the same noise (per-sample seeds, library/data/dataset.py), gradients averaged by DDP. Only rank 0
writes outputs; the latent cache is encoded half by each rank. Writes are recorded per process by
tests/multi_gpu_audit.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import ROOT, db_args, flux_files_args, make_images

# Plain SGD: Adam divides by the gradient's running magnitude, which turns the last-bit differences of a
# batch-2 versus a batch-1 UNet (other summation orders) on near-zero gradient entries into up to ~3e-5 of
# weight after 3 steps; SGD keeps them at rounding level, so 1e-5 tests the averaging itself.
TRAIN = [
    "--max_train_steps", "3", "--save_every_n_steps", "2",
    "--optimizer_type", "SGDNesterov", "--learning_rate", "1.0", "--lr_scheduler", "constant",
    "--cache_latents_to_disk", "--vae_batch_size", "1",
]  # fmt: skip
PROMPTS = "sks shape --w 64 --h 64 --s 1\n"


def _free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    model: Path,
    root: Path,
    processes: int,
    batch: int,
    *extra: str,
    images: int = 2,
    deepspeed: bool = False,
) -> subprocess.CompletedProcess:
    data, out, audit = make_images(root / "data", n=images, repeats=1), root / "out", root / "audit"
    audit.mkdir()
    (root / "prompts.txt").write_text(PROMPTS)
    args = db_args(
        model, data, out, *TRAIN, "--train_batch_size", str(batch), "--logging_dir", str(out / "logs"), *extra
    )
    launcher = ["--multi_gpu"] if processes > 1 else []
    if deepspeed:
        launcher = ["--use_deepspeed", "--zero_stage", "2"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(ROOT / "tests" / "multi_gpu_audit.py"), *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "LORATRAIN_LOG_LEVEL": "INFO",  # every rank logs its cache counts
        "AUDIT_DIRS": os.pathsep.join([str(out), str(data)]),
        "AUDIT_OUT": str(audit),
        "DEEPSPEED_ON_CPU": "1" if deepspeed else "0",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _written(root: Path, rank: int) -> list[str]:
    """Files and folders rank `rank` wrote, relative to `root`, temporary files of atomic saves left out."""
    paths = json.loads((root / "audit" / f"rank-{rank}.json").read_text())
    return sorted(str(Path(p).relative_to(root)) for p in paths if not p.endswith(".tmp"))


def _outputs(out: Path) -> list[str]:
    """Files under `out`, with timestamps (log folder, sample names) and event file names made comparable."""
    names = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).parts
        if rel[0] == "logs":
            rel = ("logs", "<run>", "events" if rel[-1].startswith("events.") else rel[-1])
        names.append(re.sub(r"_\d{14}_", "_<time>_", "/".join(rel)))
    return sorted(names)


def test_two_processes_batch_1_train_the_lora_of_one_process_batch_2(tiny_sd1_dir: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    sampling = ["--save_state", "--sample_prompts", "prompts.txt", "--sample_every_n_steps", "3"]
    _launch(tiny_sd1_dir, one, 1, 2, *sampling)
    proc = _launch(tiny_sd1_dir, two, 2, 1, *sampling)

    single, pair = (
        load_file(str(one / "out" / "feat.safetensors")),
        load_file(str(two / "out" / "feat.safetensors")),
    )
    assert sorted(single) == sorted(pair)
    assert max((single[k] - pair[k]).abs().max().item() for k in single) < 1e-5
    earlier = load_file(str(one / "out" / "feat-step00000002.safetensors"))
    assert max((single[k] - earlier[k]).abs().max().item() for k in single) > 1e-3  # step 3 moved it

    # Same outputs, all written by rank 0: LoRAs, states, the sample image, one TensorBoard event file.
    assert _outputs(two / "out") == _outputs(one / "out")
    assert any(re.fullmatch(r"sample/feat_000003_00_<time>_\d+\.png", name) for name in _outputs(two / "out"))
    assert [p for p in _written(two, 1) if p.startswith("out")] == []
    folder = "data/img/1_sks shape"
    # The disk cache: batch i of the encoding is rank i % 2's; each file exists once.
    assert [p for p in _written(two, 0) if p.startswith("data")] == [f"{folder}/img0_0064x0064_sd.npz"]
    assert _written(two, 1) == [f"{folder}/img1_0064x0064_sd.npz"]
    assert sorted(p.name for p in (two / folder).glob("*.npz")) == [
        "img0_0064x0064_sd.npz",
        "img1_0064x0064_sd.npz",
    ]
    logs = proc.stdout + proc.stderr
    assert logs.count("latent cache (disk): 2 encoded (1 by this process), 0 reused") == 2
    assert logs.count("LoRA written to") == 1


@pytest.mark.parametrize("script", ["sdxl_train_network.py", "flux_train_network.py"])
def test_sdxl_and_flux_scripts_split_both_caches(script: str, tiny_sdxl_dir: Path, tiny_flux, tmp_path: Path):
    """The other two scripts under the 2-process launch, with the RAM latent cache (latents exchanged) and the
    text-encoder output cache on disk (each file written by one process, outputs exchanged)."""
    data = make_images(tmp_path / "data", n=4, repeats=1)
    model = tiny_sdxl_dir if script.startswith("sdxl") else tiny_flux.transformer
    args = db_args(model, data, tmp_path / "out", "--max_train_steps", "2", "--train_batch_size", "1")
    args += ["--cache_latents", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only"]
    if script.startswith("flux"):
        args += [
            *flux_files_args(tiny_flux),
            "--network_module",
            "networks.lora_flux",
            "--t5xxl_max_token_length",
            "16",
        ]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(ROOT / script), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LORATRAIN_LOG_LEVEL": "INFO"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = proc.stdout + proc.stderr
    assert logs.count("latent cache (RAM): 4 encoded (2 by this process), 0 reused") == 2
    assert logs.count("text-encoder outputs (disk): 4 encoded (2 captions by this process), 0 reused") == 2
    assert len(list((data / "1_sks shape").glob("*_te*.npz"))) == 4  # _te_outputs.npz (SDXL), _flux_te.npz
    assert logs.count("LoRA written to") == 1 and (tmp_path / "out" / "feat.safetensors").is_file()


def test_deepspeed_zero2_with_accumulation_trains_the_lora_of_one_process(tiny_sd1_dir: Path, tmp_path: Path):
    """Runs where the optional `deepspeed` package is installed. accelerate supports DeepSpeed on GPUs only;
    the launch helper forms the CPU process group for it (DEEPSPEED_ON_CPU)."""
    pytest.importorskip("deepspeed")
    one, two = tmp_path / "one", tmp_path / "two"
    accumulate = ("--gradient_accumulation_steps", "2")
    _launch(tiny_sd1_dir, one, 1, 2, *accumulate, images=4)
    proc = _launch(tiny_sd1_dir, two, 2, 1, *accumulate, images=4, deepspeed=True)
    assert "ZeRO" in proc.stdout + proc.stderr
    single, pair = (
        load_file(str(one / "out" / "feat.safetensors")),
        load_file(str(two / "out" / "feat.safetensors")),
    )
    assert max((single[k] - pair[k]).abs().max().item() for k in single) < 1e-5
    assert [p for p in _written(two, 1) if p.startswith("out")] == []

"""Cache latents to disk ahead of training, with the same model and dataset flags as train_network.py.

    python tools/cache_latents.py [--sdxl | --flux] --pretrained_model_name_or_path MODEL \\
        --dataset_config ds.toml [--vae VAE] [--vae_batch_size 8] [--skip_cache_check]

Writes kohya-named `<image>_<W>x<H>_sd.npz` files next to the images (`_sdxl.npz` with `--sdxl`, `_flux.npz`
with `--flux`, kohya's switches; FLUX also takes its `--clip_l`, `--t5xxl`, `--ae` files), which
`--cache_latents_to_disk` then reuses; prints how many images were encoded and how many valid cache files
were reused, and exits.
Training-only flags (network, optimizer, output) are accepted and ignored, so a training command line or
--config_file works unchanged. Exit codes as for training: 0 done, 2 bad input.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _problems(config) -> list[str]:
    """The checks of validate.py that matter here (no output folder or network is needed)."""
    from library.data.augment import parse_face_crop_range
    from library.errors import UserError
    from library.validate import parse_resolution

    problems = []
    if not config.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required (its VAE encodes the images)")
    if not (config.dataset_config or config.train_data_dir or config.in_json):
        problems.append("no dataset: pass --dataset_config FILE.toml or --train_data_dir FOLDER")
    if config.vae_batch_size < 1:
        problems.append(f"--vae_batch_size must be positive, got {config.vae_batch_size}")
    for parse, value in (
        (parse_resolution, config.resolution),
        (parse_face_crop_range, config.face_crop_aug_range),
    ):
        try:
            parse(value)
        except UserError as exc:
            problems.extend(exc.problems)
    return problems


def cache_to_disk(argv: list[str], *, family_name: str = "sd", prog: str = "cache_latents.py") -> str:
    """Parse, scan, load the model, cache; returns the summary line. Raises UserError."""
    from library.config import parse_config
    from library.errors import UserError
    from library.training import run as R
    from tools.family_switch import load_for_caching, pop_family_switch

    family_name, argv = pop_family_switch(argv, family_name)
    config = parse_config(argv, prog=prog, description=__doc__)
    problems = _problems(config)
    if problems:
        raise UserError(*problems)
    config = replace(config, cache_latents=True, cache_latents_to_disk=True)
    # As in training: the VAE runs in the mixed-precision dtype unless --no_half_vae (never halved on CPU).
    family, dataset, bundle, device, _ = load_for_caching(config, family_name)
    report = R.cache_latents_if_needed(config, family, bundle, dataset, device)
    bad = f", {report.unreadable} unreadable images skipped" if report.unreadable else ""
    return f"latents cached to disk: {report.encoded} encoded, {report.reused} reused{bad}"


def main(argv: list[str] | None = None) -> int:
    from tools.family_switch import run_tool

    return run_tool(cache_to_disk, argv)


if __name__ == "__main__":
    sys.exit(main())

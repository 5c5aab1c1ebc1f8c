"""Cache text-encoder outputs to disk ahead of training, with the same model and dataset flags as training.

    python tools/cache_text_encoder_outputs.py [--sdxl | --flux] --pretrained_model_name_or_path MODEL \\
        --dataset_config ds.toml [--clip_skip 2] [--max_token_length 225] [--weighted_captions]

Writes kohya-named `<image>_te_outputs.npz` (FLUX: `<image>_flux_te.npz`) files next to the images (what
`--cache_text_encoder_outputs_to_disk` then reuses), prints how many were encoded and how many valid files
were reused, and exits. `--sdxl` / `--flux` pick the SDXL / FLUX family (kohya's switches; FLUX also takes
its `--clip_l`, `--t5xxl`, `--ae` files); the default is SD 1.x/2.x.
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
    from library.errors import UserError
    from library.validate import parse_resolution

    problems = []
    if not config.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required (its text encoders encode the captions)")
    elif not Path(config.pretrained_model_name_or_path).exists():
        problems.append(
            f"--pretrained_model_name_or_path: model {config.pretrained_model_name_or_path} does not exist; "
            "pass a local diffusers folder or .safetensors/.ckpt file"
        )
    if not (config.dataset_config or config.train_data_dir or config.in_json):
        problems.append("no dataset: pass --dataset_config FILE.toml or --train_data_dir FOLDER")
    if config.clip_skip is not None and config.clip_skip <= 0:
        problems.append(f"--clip_skip must be positive, got {config.clip_skip}")
    try:
        parse_resolution(config.resolution)
    except UserError as exc:
        problems.extend(exc.problems)
    return problems


def cache_to_disk(argv: list[str], *, prog: str = "cache_text_encoder_outputs.py") -> str:
    """Parse, scan, load the model, cache; returns the summary line. Raises UserError."""
    import torch

    from library.config import parse_config
    from library.errors import UserError
    from library.training.te_cache import cache_text_encoder_outputs_if_needed
    from tools.family_switch import load_for_caching, pop_family_switch

    family_name, argv = pop_family_switch(argv)
    config = parse_config(argv, prog=prog, description=__doc__)
    problems = _problems(config)
    if problems:
        raise UserError(*problems)
    config = replace(config, cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True)
    # As in training: the text encoders run in the mixed-precision dtype (never halved on CPU).
    family, dataset, bundle, device, dtype = load_for_caching(config, family_name)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    cache = cache_text_encoder_outputs_if_needed(
        config,
        family,
        bundle,
        dataset,
        device,
        dtype=dtype,
        max_token_length=None if config.max_token_length in (None, 75) else config.max_token_length,
        autocast=autocast,
    )
    return (
        f"text-encoder outputs cached to disk: {cache.report.encoded} encoded, {cache.report.reused} reused"
    )


def main(argv: list[str] | None = None) -> int:
    from tools.family_switch import run_tool

    return run_tool(cache_to_disk, argv)


if __name__ == "__main__":
    sys.exit(main())

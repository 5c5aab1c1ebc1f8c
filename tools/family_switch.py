"""What the caching tools share: kohya's `--sdxl` / `--flux` switches (default SD 1.x/2.x), loading the model
as training would, and the exit-code wrapper."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from library.errors import UserError

SWITCHES = {"--sdxl": "sdxl", "--flux": "flux"}


def pop_family_switch(argv: list[str], default: str = "sd") -> tuple[str, list[str]]:
    """(family name, argv without the switches); the training options do not know them."""
    given = sorted({a for a in argv if a in SWITCHES})
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} pick different model families; pass one of them")
    name = SWITCHES[given[0]] if given else default
    return name, [a for a in argv if a not in SWITCHES]


def load_for_caching(config: Any, family_name: str) -> tuple[Any, Any, Any, Any, Any]:
    """(family, dataset, bundle, device, dtype): the dataset scanned and the model loaded as training does it;
    components run in the mixed-precision dtype on CUDA, float32 on CPU."""
    import torch

    from library.families import get_family
    from library.training import run as R

    family = get_family(family_name)
    seed = R.pick_seed(config)  # the VAE samples its posterior: a seed makes the cache reproducible
    dataset, info = R.scan_dataset_and_model(config, family, seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = R.weight_dtype_for(config.mixed_precision) if device.type == "cuda" else torch.float32
    return family, dataset, R.load_bundle(config, family, info, dtype), device, dtype


def run_tool(work: Callable[[list[str]], str], argv: list[str] | None) -> int:
    """`work(argv)` -> its summary on stdout, exit 0; a UserError -> its lines on stderr, exit 2."""
    from library.training.run import configure_logging

    configure_logging()
    try:
        summary = work(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(summary)
    return 0

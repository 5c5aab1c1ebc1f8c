"""kohya's model switches of the caching tools: `--sdxl` / `--flux` pick the model family (default SD 1.x/2.x)."""

from __future__ import annotations

from library.errors import UserError

SWITCHES = {"--sdxl": "sdxl", "--flux": "flux"}


def pop_family_switch(argv: list[str], default: str = "sd") -> tuple[str, list[str]]:
    """(family name, argv without the switches); the training options do not know them."""
    given = sorted({a for a in argv if a in SWITCHES})
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} pick different model families; pass one of them")
    name = SWITCHES[given[0]] if given else default
    return name, [a for a in argv if a not in SWITCHES]

"""Model families behind the `ModelFamily` protocol, looked up by name (`get_family("sd")`).

Entry scripts pick the name (train_network.py -> "sd", sdxl_train_network.py -> "sdxl", flux_train_network.py -> "flux"); shared code never branches on it.
"""

from __future__ import annotations

from collections.abc import Callable

from library.errors import UserError, did_you_mean
from library.families.base import ModelBundle, ModelFamily, ModelInfo


def _sd() -> ModelFamily:
    from library.families.sd import StableDiffusionFamily

    return StableDiffusionFamily()


def _sdxl() -> ModelFamily:
    from library.families.sdxl import StableDiffusionXLFamily

    return StableDiffusionXLFamily()


def _flux() -> ModelFamily:
    from library.families.flux import FluxFamily

    return FluxFamily()


# Factories import lazily, so `import library.families` stays cheap (no diffusers/transformers import).
_FAMILIES: dict[str, Callable[[], ModelFamily]] = {"sd": _sd, "sdxl": _sdxl, "flux": _flux}


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The family registered as `name`; UserError naming the known ones otherwise."""
    try:
        return _FAMILIES[name]()
    except KeyError:
        known = ", ".join(family_names())
        raise UserError(
            f"unknown model family {name!r}{did_you_mean(name, set(_FAMILIES))}; known: {known}"
        ) from None


__all__ = ["ModelBundle", "ModelFamily", "ModelInfo", "family_names", "get_family"]

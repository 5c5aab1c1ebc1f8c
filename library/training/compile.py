"""--torch_compile: the denoiser's blocks compiled one by one with torch.compile, in place.

Blocks rather than the whole model: each block is a graph dynamo can take whole (the model's glue code with
its Python branches would break it into pieces anyway), FLUX's identical blocks share one compiled graph, and
`nn.Module.compile` keeps the module tree, so LoRA hooks, gradient checkpointing (diffusers calls the block)
and the saved keys are unchanged. Before anything is compiled the backend is tried on a tiny function, so a
platform where it cannot work (no C compiler for inductor on CPU, no triton on a GPU) trains uncompiled
after one message instead of failing at the first step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("loratrain")


def backend_problems(torch_compile: bool, backend: str, blocks_to_swap: int | None) -> list[str]:
    """--dynamo_backend must name a torch.compile backend this torch knows (checked only with --torch_compile)."""
    if not torch_compile:
        return []
    problems = []
    if blocks_to_swap:
        problems.append(
            "--torch_compile and --blocks_to_swap exclude each other (block swapping moves weights between "
            "the blocks' calls, which a compiled block cannot see); pick one"
        )
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend.lower() not in known:
        problems.append(
            f"--dynamo_backend {backend}: not a torch.compile backend here; use one of {', '.join(known)}"
        )
    return problems


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0][:200]}" if lines else type(inner).__name__


def backend_failure(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot compile (forward and backward) on `device`, or None when it can."""

    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x * 2.0 + 1.0)

    try:
        compiled = torch.compile(probe, backend=backend, fullgraph=True)
        x = torch.ones(8, device=device, requires_grad=True)
        compiled(x).sum().backward()
    except Exception as exc:  # any failure means: do not compile; the message says which
        return _reason(exc)
    return None


def compile_blocks(blocks: list[nn.Module], backend: str, device: torch.device) -> bool:
    """Compile each block in place with `backend` (compilation itself happens at the first calls); False, with
    one warning, when the backend does not work on `device`."""
    backend = backend.lower()
    failure = backend_failure(backend, device)
    if failure is not None:
        log.warning(
            "--torch_compile: the %s backend does not work here (%s); training without compilation",
            backend,
            failure,
        )
        return False
    for block in blocks:
        block.compile(backend=backend)
    log.info("--torch_compile: %d blocks compiled with %s (the first steps are slower)", len(blocks), backend)
    return True

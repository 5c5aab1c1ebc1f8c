"""A model of a training step's peak device memory, from counted bytes rather than rules of thumb.

Components (each a named byte count; the total is the expected peak):
  * frozen weights: every parameter and buffer at its stored dtype, of the modules that stay on the device;
  * LoRA parameters, their gradients (one tensor in flight with a fused backward) and the optimizer state
    (`OPTIMIZER_STATES`);
  * activations: what autograd saves for backward, counted by running the denoiser's forward + loss on the
    meta device (`profile_activations`): no memory, no arithmetic, exact shapes and dtypes. Under gradient
    checkpointing the saved bytes are attributed to the unit diffusers checkpoints (a resnet, a transformer
    block) and the peak is modelled as what is saved outside the units + the units' kept inputs + the
    largest unit's saved bytes, which its recompute rebuilds during backward;
  * backward transient: `BACKWARD_TRANSIENT` x the largest activation tensor a unit takes or gives (or
    any op saves): the gradient arriving at a unit and the one it passes on exist together with the rest;
  * allocator retention (`ALLOCATOR_RETENTION`): freed memory the allocator still holds at the peak. On the
    CPU (glibc, the bench) about 0.58 x the activation volume of the forward; on CUDA not calibrated (0).
    Without it the model matches the bench's live malloc bytes at the step peak within 5% (fp32: 5.13 vs
    5.16 GiB, bf16 + checkpointing: 2.00 vs 2.10).

Autocast does not act on meta tensors, so `EmulatedAutocast` casts at the torch-function level (above
autograd, where autocast itself works, so the saved tensors are the cast ones) following the op lists of
PyTorch's autocast for CUDA or CPU.

Plain functions with plain arguments; reading the config is library/training/estimate_run.py's job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

GIB = 1024**3
# Gradient arriving at the largest unit + the one it passes on, both the size of its largest activation.
BACKWARD_TRANSIENT = 2.0
# Memory the allocator holds beyond live tensors at the peak, per byte the whole forward saves (counted without
# checkpointing: the volume of activations that passes through the allocator in a step, once more in the
# recompute). CPU (glibc): freed activations leave holes between the kept ones that RSS still counts;
# calibrated on bench/bench_sd_memory.py, where live malloc bytes match the counted components within 5%
# and RSS exceeds them by 0.53-0.61x of that volume in all four settings. CUDA: not measured here (no GPU);
# PyTorch's caching allocator reserves more than it allocates too (max_memory_reserved - allocated is
# what to calibrate it with), so the device figure is a lower bound by that much.
ALLOCATOR_RETENTION = {"cpu": 0.58, "cuda": 0.0}

# Ops autocast runs in the low-precision dtype (both devices' lists; einsum and the matmuls also on CPU,
# where einsum decomposes into bmm below autocast).
LOW_PRECISION_OPS = frozenset(
    {
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "mm",
        "bmm",
        "baddbmm",
        "addmm",
        "addbmm",
        "einsum",
        "prelu",
        "scaled_dot_product_attention",
    }
)
# Ops autocast runs in float32: CUDA's list includes the norms and softmax (their outputs stay float32),
# CPU's only the losses and a few reductions.
FLOAT32_OPS = {
    "cuda": frozenset(
        {
            "layer_norm",
            "group_norm",
            "softmax",
            "log_softmax",
            "cumsum",
            "cumprod",
            "prod",
            "sum",
            "exp",
            "expm1",
            "log",
            "log1p",
            "pow",
            "rsqrt",
            "reciprocal",
            "softplus",
            "norm",
            "logsumexp",
            "cosine_similarity",
            "mse_loss",
            "l1_loss",
            "smooth_l1_loss",
            "huber_loss",
            "kl_div",
            "nll_loss",
            "cross_entropy",
            "binary_cross_entropy_with_logits",
        }
    ),
    "cpu": frozenset(
        {
            "mse_loss",
            "l1_loss",
            "smooth_l1_loss",
            "huber_loss",
            "kl_div",
            "nll_loss",
            "cross_entropy",
            "binary_cross_entropy_with_logits",
            "prod",
            "cdist",
        }
    ),
}
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient, on CUDA and CPU) saves for backward: q, k, v,
    the output and one float32 log-sum-exp per query row; the meta device would otherwise take the math path,
    which materialises the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # type: ignore[override]
        # The kernels write the output as [batch, length, heads, dim] and return the [b, h, l, d] view, so
        # the usual transpose + reshape after attention is a view of it, not a copy.
        if q.ndim == 4:
            out = q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # never run: meta forwards are only counted
        raise NotImplementedError


def _fused_attention(query, key, value, attn_mask=None, *args: Any, **kwargs: Any) -> torch.Tensor:
    if query.device.type != "meta":
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs)
    return _FusedAttention.apply(query, key, value, attn_mask)


class EmulatedAutocast(TorchFunctionMode):
    """torch.autocast(device_type, dtype) for tensors autocast ignores (the meta device): floating inputs
    of the listed ops are cast before the op, so autograd records and saves the cast tensors, as it does
    under autocast. `dtype` None: no autocast. Attention on meta tensors counts as a fused kernel."""

    def __init__(self, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.float32_ops = FLOAT32_OPS[device_type]
        self.dtype = dtype

    def __enter__(self) -> EmulatedAutocast:
        # Code that asks whether autocast is on (library/memory/linear.py's fp8 Linear) must hear "yes" for
        # meta tensors too; torch itself knows no autocast state for the meta device.
        self._asked = torch.is_autocast_enabled, torch.get_autocast_dtype
        enabled, dtype = self._asked

        def is_enabled(device_type: str | None = None) -> bool:
            if device_type == "meta":
                return self.dtype is not None
            return enabled() if device_type is None else enabled(device_type)

        def get_dtype(device_type: str) -> torch.dtype:
            return self.dtype or torch.float32 if device_type == "meta" else dtype(device_type)

        def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:  # e.g. enabled=False around a cast
            return self._autocast("cpu" if device_type == "meta" else device_type, *args, **kwargs)

        self._autocast = torch.autocast
        torch.is_autocast_enabled, torch.get_autocast_dtype = is_enabled, get_dtype
        torch.autocast = autocast  # type: ignore[assignment]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.is_autocast_enabled, torch.get_autocast_dtype = self._asked
        torch.autocast = self._autocast  # type: ignore[misc]
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = (
            None
            if self.dtype is None
            else self.dtype
            if name in LOW_PRECISION_OPS
            else torch.float32
            if name in self.float32_ops and kwargs.get("dtype") is None
            else None
        )
        if target is not None:

            def cast(value: Any) -> Any:
                if isinstance(value, torch.Tensor) and value.dtype in _CASTABLE and value.dtype != target:
                    return value.to(target)
                return value

            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        if name == "scaled_dot_product_attention":
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def compute_context(mixed_precision: str, device_type: str = "cuda") -> EmulatedAutocast:
    """The emulated autocast of `--mixed_precision` ("no": no casts, only the fused attention)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return EmulatedAutocast(device_type, dtype)


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


@dataclass
class ActivationProfile:
    """Bytes autograd saves in one forward + loss, by where they were saved (storages counted once)."""

    outside: dict[int, int] = field(default_factory=dict)  # saved while no checkpointed unit ran
    unit_inputs: dict[int, int] = field(default_factory=dict)  # tensors the checkpointed units were given
    units: list[dict[int, int]] = field(default_factory=list)  # saved inside each unit call
    largest_unit_tensor: int = 0  # the largest tensor a unit took or returned
    largest_saved_tensor: int = 0

    def saved_bytes_by_storage(self) -> dict[int, int]:
        everything = dict(self.outside)
        for unit in self.units:
            everything.update(unit)
        return everything

    def saved_bytes(self) -> int:
        """Without checkpointing: everything saved, each storage once."""
        return sum(self.saved_bytes_by_storage().values())

    def checkpointed_bytes(self, inputs_on_host: bool = False) -> int:
        """With checkpointing: outside + kept unit inputs + the largest unit's own saved bytes, which exist
        only while backward recomputes that unit. `inputs_on_host`: --cpu_offload_checkpointing."""
        kept = dict(self.outside)
        if not inputs_on_host:
            kept.update(self.unit_inputs)
        own = (sum(v for k, v in unit.items() if k not in kept) for unit in self.units)
        return sum(kept.values()) + max(own, default=0)

    def transient_bytes(self) -> int:
        """Backward's gradients in flight (see BACKWARD_TRANSIENT)."""
        return int(BACKWARD_TRANSIENT * max(self.largest_unit_tensor, self.largest_saved_tensor))


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda v: found.append(v) if isinstance(v, torch.Tensor) else None, list(values))
    return found


def profile_activations(
    model: torch.nn.Module,
    forward_and_loss: Callable[[], torch.Tensor],
    *,
    skip: Iterable[torch.Tensor] = (),
    units: bool = True,
) -> ActivationProfile:
    """Run `forward_and_loss` once and count what autograd saves, skipping the storages of `model`'s
    parameters and buffers and of `skip` (frozen weights are counted as weights, not activations).

    `units`: where `model` is a diffusers model with gradient checkpointing, its checkpoint function is
    replaced by one that runs the unit plainly and marks which unit is running, so every saved tensor is
    seen and attributed; checkpointing is switched off again afterwards."""
    profile = ActivationProfile()
    weights = {_key(t) for t in [*model.parameters(), *model.buffers(), *skip]}
    running: list[int] = []  # index of the unit call in progress (outermost first)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _key(tensor)
        if key not in weights:
            size = _nbytes(tensor)
            (profile.units[running[0]] if running else profile.outside)[key] = size
            profile.largest_saved_tensor = max(profile.largest_saved_tensor, size)
        return tensor

    def run_unit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        outermost = not running
        if outermost:
            profile.units.append({})
            running.append(len(profile.units) - 1)
            for tensor in _tensors([args, kwargs]):
                profile.unit_inputs[_key(tensor)] = _nbytes(tensor)
                profile.largest_unit_tensor = max(profile.largest_unit_tensor, _nbytes(tensor))
        try:
            out = fn(*args, **kwargs)
        finally:
            if outermost:
                running.pop()
        for tensor in _tensors([out]):
            profile.largest_unit_tensor = max(profile.largest_unit_tensor, _nbytes(tensor))
        return out

    hooked = units and getattr(model, "is_gradient_checkpointing", False)
    if hooked:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=run_unit)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward_and_loss()
        del loss
    finally:
        if hooked:
            model.disable_gradient_checkpointing()
    return profile


# Optimizer state per trained element, by kohya name (lower case): (states of the parameter's dtype,
# extra bytes per element). 8-bit states are 1 byte each (plus block scales, ignored). Sources: each
# optimizer's `step` (the tensors it allocates per parameter).
OPTIMIZER_STATES: dict[str, tuple[int, int]] = {
    "adamw": (2, 0),
    "pagedadamw": (2, 0),
    "pagedadamw32bit": (2, 0),
    "adamw8bit": (0, 2),
    "pagedadamw8bit": (0, 2),
    "lion": (1, 0),
    "lion8bit": (0, 1),
    "pagedlion8bit": (0, 1),
    "sgdnesterov": (1, 0),  # momentum buffer (kohya sets momentum 0.9)
    "sgdnesterov8bit": (0, 1),
    "prodigy": (4, 0),  # exp_avg, exp_avg_sq, s, p0
    "dadaptation": (3, 0),  # exp_avg, exp_avg_sq, s
    "dadaptadampreprint": (3, 0),
    "dadaptadam": (3, 0),
    "dadaptadagrad": (3, 0),  # alpha_k, sk, x0
    "dadaptadan": (4, 0),  # exp_avg, exp_avg_sq, exp_avg_diff, pre_grad (+ s)
    "dadaptadanip": (4, 0),
    "dadaptlion": (2, 0),  # exp_avg, s
    "dadaptsgd": (3, 0),  # z, s, x0
    "adamwschedulefree": (2, 0),  # z, exp_avg_sq
    "radamschedulefree": (2, 0),
    "sgdschedulefree": (1, 0),  # z
}


def optimizer_state_bytes(
    optimizer_type: str, params: Iterable[torch.Tensor], momentum: bool = True
) -> tuple[int, str]:
    """Bytes of optimizer state for `params` and a note (empty, or how an unknown optimizer was counted).
    Adafactor keeps, per matrix, one float32 value per row and per column (per element for vectors)."""
    kind = optimizer_type.lower()
    params = list(params)
    if kind == "adafactor" or kind.endswith(".adafactor"):
        return sum(
            (p.shape[0] + p.numel() // p.shape[0]) * 4 if p.ndim >= 2 else p.numel() * 4 for p in params
        ), ""
    if kind in ("sgd", "torch.optim.sgd"):
        return (sum(p.numel() * p.element_size() for p in params) if momentum else 0), ""
    states, extra = OPTIMIZER_STATES.get(kind, (2, 0))
    note = "" if kind in OPTIMIZER_STATES else f"optimizer {optimizer_type}: state unknown, counted as AdamW"
    return sum(p.numel() * (states * p.element_size() + extra) for p in params), note


def gradient_bytes(params: Iterable[torch.Tensor], fused_groups: int | None = None) -> int:
    """Gradients of the trained tensors, in their dtype. `fused_groups`: 0 = --fused_backward_pass (one
    tensor's gradient in flight), N = --fused_optimizer_groups N (about one group's)."""
    sizes = [p.numel() * p.element_size() for p in params]
    if fused_groups is None:
        return sum(sizes)
    if fused_groups == 0:
        return max(sizes, default=0)
    return max(-(-sum(sizes) // fused_groups), max(sizes, default=0))


def _region(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    # Weights may be views of one storage (fused qkv split into q, k, v; a memory-mapped file), so a weight
    # is its region of a storage; a tied weight is the same region and counts once.
    return _key(tensor), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of tensors at their stored dtype, each tensor (storage region) once."""
    seen = {_region(t): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())


def module_bytes(module: torch.nn.Module, exclude: Iterable[torch.nn.Module] = ()) -> int:
    """Parameters and buffers of `module` at their stored dtype, less those inside `exclude`."""
    skip = {_region(t) for m in exclude for t in [*m.parameters(), *m.buffers()]}
    return tensor_bytes(t for t in [*module.parameters(), *module.buffers()] if _region(t) not in skip)


@dataclass
class MemoryEstimate:
    components: list[tuple[str, int]]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.components)

    def table(self) -> str:
        width = max(len(name) for name, _ in [*self.components, ("expected peak device memory", 0)])
        lines = [f"{'component':<{width}}  {'GiB':>8}"]
        lines += [f"{name:<{width}}  {size / GIB:>8.3f}" for name, size in self.components]
        lines.append(f"{'expected peak device memory':<{width}}  {self.total / GIB:>8.3f}")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def estimate_step(
    *,
    frozen: list[tuple[str, int]],
    trained: list[torch.Tensor],
    optimizer_type: str,
    profile: ActivationProfile,
    checkpointing: bool,
    fused_groups: int | None = None,
    inputs_on_host: bool = False,
    momentum: bool = True,
    allocator: str = "cuda",
) -> MemoryEstimate:
    """The peak of one training step: `frozen` (name, bytes) weights on the device, the `trained` tensors
    with their gradients and optimizer state, the activations of `profile` and what the `allocator`
    ("cuda" or "cpu", see ALLOCATOR_RETENTION) keeps besides."""
    state, note = optimizer_state_bytes(optimizer_type, trained, momentum)
    activations = profile.checkpointed_bytes(inputs_on_host) if checkpointing else profile.saved_bytes()
    kind = "gradient checkpointing" if checkpointing else "saved for backward"
    components = [
        *frozen,
        ("LoRA parameters", tensor_bytes(trained)),
        ("LoRA gradients", gradient_bytes(trained, fused_groups)),
        (f"optimizer state ({optimizer_type})", state),
        (f"activations ({kind})", activations),
        ("backward transient", profile.transient_bytes()),
    ]
    retention = int(ALLOCATOR_RETENTION[allocator] * profile.saved_bytes())
    if retention:
        components.append((f"{allocator} allocator retention", retention))
    return MemoryEstimate(components, [note] if note else [])

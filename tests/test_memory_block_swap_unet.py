"""--blocks_to_swap for SD 1.x/2.x and SDXL UNets: the unit list (library/families/sd_blocks.py) and the
block swapper on real tiny UNets with a LoRA, checked on CPU with an injected poisoning mover.

The mover overwrites an evicted unit's frozen tensors with NaN *in place*, so a unit used while it is away
(or a tensor saved in forward that still points at the storage it had then) shows up as NaN outputs or
gradients; equal results with and without swapping prove every use came after its fetch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from swap_helpers import PoisonMover
from swap_helpers import frozen_tensors as _frozen
from torch import nn
from train_helpers import db_args, error_lines, make_images, run_main, run_sdxl

from library.families import tiny, tiny_sdxl
from library.families.sd_blocks import unet_swap_units
from library.memory.block_swap import BlockSwapper
from networks.lora import create_network

CONFIGS = {"sd1": tiny.unet_config("sd1"), "sd2": tiny.unet_config("sd2"), "sdxl": tiny_sdxl.unet_config()}
# The tiny SD 1.x/2.x have one resnet per level and two levels; the tiny SDXL has SDXL's topology.
UNITS = {"sd1": 14, "sd2": 14, "sdxl": 32}


def _unet(kind: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIGS[kind]).requires_grad_(False)


def _inputs(kind: str) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(1)
    config = CONFIGS[kind]
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, config["cross_attention_dim"], generator=gen)
    kwargs: dict = {"encoder_hidden_states": context}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, tiny_sdxl.TE2_PROJECTION, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    return (x, torch.tensor([10, 700])), kwargs


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_units_are_the_execution_order_and_hold_every_block_weight(kind):
    unet = _unet(kind)
    units = unet_swap_units(unet)
    assert len(units) == UNITS[kind]
    ran: list[nn.Module] = []
    for unit in units:
        unit.register_forward_pre_hook(lambda module, _args: ran.append(module))
    with torch.no_grad():
        args, kwargs = _inputs(kind)
        unet(*args, **kwargs)
    assert [id(m) for m in ran] == [id(m) for m in units]
    # Every weight of the down, mid and up blocks is in exactly one unit: none is used outside a unit.
    in_units = [id(p) for unit in units for p in unit.parameters()]
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert sorted(in_units) == sorted(id(p) for block in blocks for p in block.parameters())
    if kind == "sdxl":  # blocks without attention and transformer depth 2 are both covered
        assert type(unet.down_blocks[0]).__name__ == "DownBlock2D"
        assert len(unet.up_blocks[0].attentions[0].transformer_blocks) == 2


def test_real_models_unit_counts():
    from accelerate import init_empty_weights

    with init_empty_weights():
        sd1 = UNet2DConditionModel()  # diffusers' defaults are SD 1.x's topology
        sdxl = UNet2DConditionModel(**tiny_sdxl.REAL_UNET_CONFIG)
    assert (len(unet_swap_units(sd1)), len(unet_swap_units(sdxl))) == (44, 32)
    # The up blocks hold most of the weight (why N counts from the end).
    up = sum(p.numel() for p in sdxl.up_blocks.parameters())
    assert up / sum(p.numel() for p in sdxl.parameters()) > 0.5


class StillMover:
    """The schedule without moving anything."""

    def fetch(self, index: int) -> None:
        pass

    def wait(self, index: int) -> None:
        pass

    def evict(self, index: int) -> None:
        pass


def _lora(unet: UNet2DConditionModel):
    # LoCon too, so the resnets' convolutions carry trainable modules.
    network = create_network(1.0, 4, 2.0, None, None, unet, conv_dim="4", conv_alpha="1")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero up AND down, so every module has gradients
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    network.apply_to(None, unet, apply_text_encoder=False)
    return network


def _step(unet, network, kind: str, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in network.parameters():
        p.grad = None
    args, kwargs = _inputs(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = unet(*args, **kwargs).sample.float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in network.parameters()]


def _model(kind: str, checkpointing: bool, bf16: bool):
    # bf16: frozen weights in the autocast dtype and a float32 LoRA, as --mixed_precision bf16 trains.
    unet = _unet(kind).to(torch.bfloat16 if bf16 else torch.float32)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    return unet, _lora(unet)


CASES = [
    *[
        (kind, count, ckpt, False)
        for kind in ("sd1", "sdxl")
        for count in (3, "all")
        for ckpt in (False, True)
    ],
    # bf16 without checkpointing: forward's saved tensors reach backward (nothing is recomputed), and the
    # swapped units have Linear layers whose input needs a gradient (SDXL's last three have none).
    ("sd1", 3, False, True),
    ("sdxl", "all", False, True),
]


@pytest.mark.parametrize(("kind", "count", "checkpointing", "bf16"), CASES)
def test_swapped_unet_computes_the_same_loss_and_gradients(kind, count, checkpointing, bf16):
    want_loss, want_grads = _step(*_model(kind, checkpointing, bf16), kind, bf16)
    unet, network = _model(kind, checkpointing, bf16)
    units = unet_swap_units(unet)
    n = len(units) if count == "all" else count
    ref: list = []
    mover = PoisonMover(units, ref)
    mover.poison_all(len(units) - n)  # swapped units start away from the "device"
    swapper = BlockSwapper(units, n, "cpu", mover=mover)
    ref.append(swapper)
    for step in range(2):  # the second step finds nothing left poisoned or stale
        loss, grads = _step(unet, network, kind, bf16)
        assert torch.isfinite(loss) and torch.equal(loss, want_loss), step
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True)), step
        assert mover.max_resident <= 2 and len(swapper.resident) <= 2
        if step == 0:
            # In execution order each unit travels once per direction; the last one stays for backward.
            # (A wrong order still computes right, fetching on demand, but fetches some units again.)
            fetches = Counter(i for op, i in mover.calls if op == "fetch")
            assert set(fetches) == set(range(len(units) - n, len(units)))
            assert max(fetches.values()) == 2 and fetches[len(units) - 1] == 1
    # Nothing was registered on the model: the unit list is a plain list, not a ModuleList.
    assert unet.state_dict().keys() == _unet(kind).state_dict().keys()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_swapped_units_save_no_copy_or_view_of_their_weights(autocast):
    """What backward keeps of a swapped unit: its parameters themselves, never a view of the storage they
    had in forward (F.linear's `weight.t()`, replaced by library/memory/linear.py) nor a cast copy. Conv2d
    and GroupNorm save the parameter itself when it is in the compute dtype, which it is in training (the
    weights load in the mixed-precision dtype), so they keep their ordinary forward."""
    dtype = torch.bfloat16 if autocast else torch.float32
    unet = _unet("sdxl").to(dtype)
    network = _lora(unet).to(dtype)
    units = unet_swap_units(unet)
    BlockSwapper(units, len(units), "cpu", mover=StillMover())  # storage stays put: pointers compare
    weights = {t.untyped_storage().data_ptr(): t for unit in units for t in _frozen(unit)}
    shapes = {tuple(t.shape) for t in weights.values() if t.dim() >= 2}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    args, kwargs = _inputs("sdxl")
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        unet(args[0].to(dtype), args[1], **kwargs).sample.float().square().mean().backward()
    kept = [t for t in saved if t.untyped_storage().data_ptr() in weights]
    assert kept and all(any(t is w for w in weights.values()) for t in kept)
    assert not [t for t in saved if tuple(t.shape) in shapes and not any(t is w for w in weights.values())]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in network.parameters())


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def test_train_network_block_swap_on_cpu_is_a_noop_with_a_message(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, caplog
):
    from safetensors.torch import load_file

    def args(out: str, *extra: str) -> list[str]:
        return db_args(tiny_sd1_dir, dataset, tmp_path / out, "--max_train_steps", "2", *extra)

    assert run_main(args("plain")) == 0
    with caplog.at_level("INFO"):
        assert run_main(args("swap", "--blocks_to_swap", "3")) == 0
    assert "blocks_to_swap=3 ignored: block swapping needs a CUDA device, not cpu" in caplog.text
    plain, swap = (load_file(str(tmp_path / d / "feat.safetensors")) for d in ("plain", "swap"))
    assert plain.keys() == swap.keys() and all(torch.equal(plain[k], swap[k]) for k in plain)


def test_too_many_blocks_is_one_line_naming_the_flag_and_the_count(
    tiny_sdxl_dir: Path, dataset: Path, tmp_path: Path, capsys
):
    # SD 1.x's is in tests/test_train_flux_memory.py::test_memory_flags_are_checked_up_front.
    out = tmp_path / "out"
    assert run_sdxl(db_args(tiny_sdxl_dir, dataset, out, "--blocks_to_swap", "33")) == 2
    assert error_lines(capsys) == [
        "error: --blocks_to_swap 33: this UNet has 32 swappable blocks (resnets, attentions, "
        "down/upsamplers): use 32 or fewer"
    ]
    assert not out.exists()

"""Every --optimizer_type alias takes one real step on a tiny LoRA; kohya's defaults, fallbacks and errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import NAME, db_args, error_lines, metadata, run_main

from library.families.tiny import build_tiny_sd
from library.training.optim import (
    build_optimizer,
    check_optimizer,
    create_scheduler,
    effective_scheduler,
    optimizer_eval,
    optimizer_train,
)
from networks.lora import create_network

CPU = torch.device("cpu")

# alias -> (package it needs, class that runs on CPU)
ALIASES = {
    "AdamW": (None, "torch.optim.adamw.AdamW"),
    "adamw8bit": (None, "torch.optim.adamw.AdamW"),
    "PagedAdamW": (None, "torch.optim.adamw.AdamW"),
    "PagedAdamW8bit": (None, "torch.optim.adamw.AdamW"),
    "PagedAdamW32bit": (None, "torch.optim.adamw.AdamW"),
    "Lion": ("lion_pytorch", "lion_pytorch.lion_pytorch.Lion"),
    "Lion8bit": ("lion_pytorch", "lion_pytorch.lion_pytorch.Lion"),
    "PagedLion8bit": ("lion_pytorch", "lion_pytorch.lion_pytorch.Lion"),
    "SGDNesterov": (None, "torch.optim.sgd.SGD"),
    "SGDNesterov8bit": (None, "torch.optim.sgd.SGD"),
    "Adafactor": (None, "transformers.optimization.Adafactor"),
    "Prodigy": ("prodigyopt", "prodigyopt.prodigy.Prodigy"),
    "DAdaptation": ("dadaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"),
    "DAdaptAdamPreprint": ("dadaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"),
    "DAdaptAdaGrad": ("dadaptation", "dadaptation.dadapt_adagrad.DAdaptAdaGrad"),
    "DAdaptAdam": ("dadaptation", "dadaptation.dadapt_adam.DAdaptAdam"),
    "DAdaptAdan": ("dadaptation", "dadaptation.dadapt_adan.DAdaptAdan"),
    "DAdaptAdanIP": ("dadaptation", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP"),
    "DAdaptLion": ("dadaptation", "dadaptation.dadapt_lion.DAdaptLion"),
    "DAdaptSGD": ("dadaptation", "dadaptation.dadapt_sgd.DAdaptSGD"),
    "AdamWScheduleFree": ("schedulefree", None),
    "RAdamScheduleFree": ("schedulefree", None),
    "SGDScheduleFree": ("schedulefree", None),
    "torch.optim.RMSprop": (None, "torch.optim.rmsprop.RMSprop"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_sd("sd1", tokenizer_dir=tmp_path_factory.mktemp("tok"))


def _unet_loss(tiny, network) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, tiny.text_encoder.config.hidden_size, generator=g)
    out = tiny.unet(sample, torch.tensor([10]), encoder_hidden_states=context).sample
    return out.float().pow(2).mean()


@pytest.mark.parametrize("alias", list(ALIASES))
def test_one_step_per_alias(tiny, alias: str, caplog: pytest.LogCaptureFixture):
    package, expected_class = ALIASES[alias]
    if package:
        pytest.importorskip(package)
    torch.manual_seed(0)
    network = create_network(1.0, 4, 2.0, tiny.vae, tiny.text_encoder, tiny.unet)
    network.apply_to(tiny.text_encoder, tiny.unet, apply_text_encoder=False, apply_unet=True)
    try:
        for lora in network.all_loras:
            torch.nn.init.normal_(lora.lora_up.weight, std=0.01)  # zero-init up would leave down untouched
        groups, _ = network.prepare_optimizer_params(None, None, 1e-3)
        before = [p.detach().clone() for g in groups for p in g["params"]]
        with caplog.at_level(logging.WARNING):
            optimizer, desc = build_optimizer(alias, groups, 1e-3, {}, CPU)
        scheduler = create_scheduler(
            effective_scheduler(alias, {}, "constant"), optimizer, warmup_steps=0, total_steps=1
        )
        _unet_loss(tiny, network).backward()
        optimizer.step()
        scheduler.step()
        after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
    finally:
        network.remove()
    cls = type(optimizer)
    if expected_class:
        assert f"{cls.__module__}.{cls.__name__}" == expected_class
    else:
        assert cls.__name__ == alias
    assert all(bool(torch.isfinite(p).all()) for p in after)
    changed = sum(int((a != b).sum()) for a, b in zip(after, before, strict=True))
    if alias == "RAdamScheduleFree":
        # RAdam's rectification makes its first steps no-ops (silent SGD phase); the step still counts
        assert optimizer.param_groups[0]["k"] == 1
    else:
        assert changed > 0
    if alias.lower() in ("adamw8bit", "pagedadamw", "pagedadamw8bit", "pagedadamw32bit", "lion8bit"):
        assert "needs a CUDA GPU; using" in caplog.text


def test_kohya_defaults_recorded_like_kohya():
    params = [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.5}]
    sgd, desc = build_optimizer("SGDNesterov", params, 0.5, {}, CPU)
    assert (sgd.defaults["nesterov"], sgd.defaults["momentum"]) == (True, 0.9)
    assert desc == "torch.optim.SGD(momentum=0.9)"
    ada, desc = build_optimizer(
        "adafactor", [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 1.0}], 1.0, {}, CPU
    )
    # relative_step: Adafactor computes its own lr (lr None, group lrs dropped), scale_parameter etc. defaults
    assert (ada.defaults["lr"], ada.defaults["relative_step"], ada.defaults["scale_parameter"]) == (
        None,
        True,
        True,
    )
    assert (
        ada.defaults["warmup_init"] is False
        and desc == "transformers.optimization.Adafactor(relative_step=True)"
    )
    _, desc = build_optimizer(
        "Adafactor",
        [{"params": [torch.nn.Parameter(torch.ones(3))]}],
        1.0,
        {"relative_step": False, "warmup_init": True},
        CPU,
    )
    assert desc == "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"


def test_adafactor_forces_its_schedule(caplog: pytest.LogCaptureFixture):
    from transformers.optimization import AdafactorSchedule

    from library.training.optim import ScheduleOptions

    with caplog.at_level(logging.WARNING):
        assert effective_scheduler("Adafactor", {}, "cosine") == "adafactor"
    assert "using the adafactor schedule instead of cosine" in caplog.text
    assert effective_scheduler("Adafactor", {"relative_step": False}, "cosine") == "cosine"
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt, _ = build_optimizer("Adafactor", [{"params": [p], "lr": 1e-3}], 1e-3, {}, CPU)
    sched = create_scheduler(
        "adafactor", opt, warmup_steps=0, total_steps=5, options=ScheduleOptions(initial_lr=1e-3)
    )
    assert isinstance(sched, AdafactorSchedule)
    assert sched.get_last_lr() == [1e-3]  # before the first step: the initial lr, as kohya logs it
    p.pow(2).sum().backward()
    opt.step()
    sched.step()
    # relative_step lr at step 1: min(1e-2, 1/sqrt(1)) * max(eps2=1e-3, RMS(p)=1) (scale_parameter)
    assert sched.get_last_lr() == [pytest.approx(1e-2)]


def test_schedule_free_train_eval_toggle():
    schedulefree = pytest.importorskip("schedulefree")
    p = torch.nn.Parameter(torch.ones(3))
    opt, _ = build_optimizer("AdamWScheduleFree", [{"params": [p], "lr": 0.1}], 0.1, {}, CPU)
    assert isinstance(opt, schedulefree.AdamWScheduleFree) and opt.param_groups[0]["train_mode"]
    for _ in range(3):  # after one step both points coincide
        (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        opt.step()
        opt.zero_grad()
    train_point = p.detach().clone()
    optimizer_eval(opt)
    assert not opt.param_groups[0]["train_mode"] and not torch.equal(p.detach(), train_point)
    optimizer_train(opt)
    assert opt.param_groups[0]["train_mode"]
    assert torch.allclose(p.detach(), train_point, atol=1e-7)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    optimizer_eval(plain)  # no-ops for optimizers without train/eval
    optimizer_train(plain)


def test_schedule_free_saves_averaged_weights_and_training_state(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path
):
    pytest.importorskip("schedulefree")
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "3",
        "--optimizer_type",
        "AdamWScheduleFree",
        "--lr_scheduler",
        "cosine",
        "--save_state_on_train_end",
        "--cache_latents",
    )
    assert run_main(args) == 0
    final = load_file(str(out / f"{NAME}.safetensors"))
    state = load_file(str(out / f"{NAME}-state" / "network.safetensors"))
    assert metadata(out / f"{NAME}.safetensors")["ss_optimizer"] == "schedulefree.AdamWScheduleFree"
    ups = [k for k in final if k.endswith("lora_up.weight")]
    # the LoRA file holds the averaged (eval) point, the state the training point
    assert any(not torch.equal(final[k], state[k]) for k in ups)


@pytest.mark.parametrize(
    ("optimizer_type", "expected_desc", "warning"),
    [
        ("SGDNesterov", "torch.optim.SGD(momentum=0.9)", None),
        ("Adafactor", "transformers.optimization.Adafactor(relative_step=True)", "instead of constant"),
        (
            "SGDNesterov8bit",
            "torch.optim.SGD(momentum=0.9)",
            "SGDNesterov8bit needs a CUDA GPU; using torch.optim.SGD",
        ),
    ],
)
def test_alias_end_to_end(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog, optimizer_type, expected_desc, warning
):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "1",
        "--optimizer_type",
        optimizer_type,
        "--cache_latents",
    )
    with caplog.at_level(logging.WARNING):
        assert run_main(args) == 0
    assert metadata(out / f"{NAME}.safetensors")["ss_optimizer"] == expected_desc
    if warning:
        assert warning in caplog.text


def test_unknown_optimizer_lists_the_valid_names():
    (problem,) = check_optimizer("AdamW9bit", {})
    assert problem.startswith(
        "--optimizer_type: unknown optimizer 'AdamW9bit' (did you mean \"AdamW8bit\"?); use one of AdamW, "
        "AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, "
    )
    assert problem.endswith("SGDScheduleFree, or a class path like torch.optim.SGD")


@pytest.mark.parametrize(
    ("alias", "module", "expected"),
    [
        (
            "Prodigy",
            "prodigyopt",
            "--optimizer_type: cannot import prodigyopt (import of prodigyopt halted; None in sys.modules); "
            'install it with: pip install prodigyopt (or pip install "loratrain[optimizers]")',
        ),
        (
            "Lion8bit",
            "lion_pytorch",
            "--optimizer_type Lion8bit: without CUDA it runs as lion_pytorch.Lion; --optimizer_type: cannot "
            "import lion_pytorch (import of lion_pytorch halted; None in sys.modules); install it with: pip "
            'install lion-pytorch (or pip install "loratrain[optimizers]")',
        ),
    ],
)
def test_missing_optional_package_names_the_pip_command(monkeypatch, alias: str, module: str, expected: str):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if it were not installed
    assert check_optimizer(alias, {}) == [expected]


def test_optimizer_problems_before_weights_load(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys, monkeypatch
):
    from library.families.sd import StableDiffusionFamily

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", no_weights)
    args = db_args(
        tiny_sd1_dir,
        data2,
        tmp_path / "out",
        "--optimizer_type",
        "SGDNesterov",
        "--optimizer_args",
        "momentun=0.8",
    )
    assert run_main(args) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: --optimizer_args: torch.optim.SGD does not accept momentun; it accepts ")


@pytest.mark.parametrize("optimizer_type", ["AdamWScheduleFree", "Adafactor", "Prodigy"])
def test_resume_is_exact_with_stateful_optimizers(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, optimizer_type
):
    """4 steps straight (saving at step 2) == 2 steps + --save_state + --resume to 4, bit for bit."""
    pytest.importorskip(
        {"AdamWScheduleFree": "schedulefree", "Prodigy": "prodigyopt"}.get(optimizer_type, "torch")
    )
    common = ["--cache_latents", "--optimizer_type", optimizer_type, "--save_state", "--learning_rate", "0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = db_args(
        tiny_sd1_dir, data2, straight, "--max_train_steps", "4", "--save_every_n_steps", "2", *common
    )
    assert run_main(args) == 0
    assert run_main(db_args(tiny_sd1_dir, data2, split, "--max_train_steps", "2", *common)) == 0
    resume = ["--max_train_steps", "4", "--resume", str(split / f"{NAME}-state")]
    assert run_main(db_args(tiny_sd1_dir, data2, split, *resume, *common)) == 0
    a = load_file(str(straight / f"{NAME}.safetensors"))
    b = load_file(str(split / f"{NAME}.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_legacy_optimizer_flags(tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys):
    from library.training.optim import requested_optimizer

    assert requested_optimizer("AdamW", True, False) == ("AdamW8bit", [])
    assert requested_optimizer("adamw", False, True) == ("Lion", [])
    assert requested_optimizer("Prodigy", False, False) == ("Prodigy", [])
    assert requested_optimizer("AdamW", True, True)[1] == [
        "--use_8bit_adam and --use_lion_optimizer exclude each other; use --optimizer_type"
    ]
    args = db_args(
        tiny_sd1_dir, data2, tmp_path / "out", "--use_lion_optimizer", "--optimizer_type", "Prodigy"
    )
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --use_lion_optimizer and --optimizer_type Prodigy name two optimizers; keep --optimizer_type"
    ]
    out = tmp_path / "ok"
    assert (
        run_main(
            db_args(tiny_sd1_dir, data2, out, "--max_train_steps", "1", "--use_8bit_adam", "--cache_latents")
        )
        == 0
    )
    assert metadata(out / f"{NAME}.safetensors")["ss_optimizer"] == "torch.optim.AdamW"


def test_adafactor_logs_its_own_learning_rate(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    from train_helpers import tb_scalars

    out, logs = tmp_path / "out", tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir, data2, out, "--max_train_steps", "3", "--optimizer_type", "Adafactor",
        "--lr_scheduler", "adafactor", "--cache_latents", "--logging_dir", str(logs),
    )  # fmt: skip
    assert run_main(args) == 0
    for tag in ("lr/unet", "lr/textencoder"):
        values = [e.value for e in tb_scalars(logs, tag)]
        # relative_step: min(1e-2, 1/sqrt(step)) * RMS(first param of the group) -- positive, at most 1e-2 * RMS
        assert len(values) == 3 and all(0 < v < 1e-2 for v in values), (tag, values)
    # kohya's record of Adafactor's own schedule: "adafactor:<initial lr>" (db_args sets --learning_rate 1e-3)
    assert metadata(out / f"{NAME}.safetensors")["ss_lr_scheduler"] == "adafactor:0.001"

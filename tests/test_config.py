"""Config parsing: kohya flag names and defaults, TOML/YAML merging, unknown keys, --output_config."""

from pathlib import Path

import pytest

from library.config import load_config_file, parse_config, write_output_config
from library.errors import UserError
from library.validate import parse_resolution, validate

ARGS = dict(prog="train_network.py", description="test")


def test_kohya_defaults():
    config = parse_config([], **ARGS)
    assert config.learning_rate == 2e-6
    assert config.max_train_steps == 1600
    assert config.network_alpha == 1.0
    assert config.caption_extension == ".caption"
    assert (config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps) == (256, 1024, 64)
    assert config.optimizer_type == "AdamW"
    assert config.lr_scheduler == "constant"
    assert config.save_model_as == "safetensors"
    assert config.max_grad_norm == 1.0
    assert config.mixed_precision == "no"


def test_cli_types_and_lists():
    config = parse_config(
        [
            "--learning_rate=1e-4",
            "--network_dim",
            "16",
            "--network_args",
            "conv_dim=4",
            "conv_alpha=1",
            "--text_encoder_lr",
            "5e-5",
            "--sdpa",
            "--mixed_precision",
            "bf16",
        ],
        **ARGS,
    )
    assert config.learning_rate == 1e-4
    assert config.network_dim == 16
    assert config.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert config.text_encoder_lr == [5e-5]
    assert config.sdpa is True
    assert config.mixed_precision == "bf16"


def test_toml_sections_flattened_and_cli_wins(tmp_path: Path):
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        '[model]\npretrained_model_name_or_path = "m"\n[training]\nlearning_rate = 1e-4\n'
        'max_train_steps = 10\n[anything]\nnetwork_args = ["conv_dim=4"]\n'
    )
    config = parse_config(["--config_file", str(cfg), "--max_train_steps", "20"], **ARGS)
    assert config.pretrained_model_name_or_path == "m"
    assert config.learning_rate == 1e-4
    assert config.max_train_steps == 20  # CLI beats the file
    assert config.network_args == ["conv_dim=4"]


def test_toml_extension_may_be_omitted(tmp_path: Path):
    (tmp_path / "train.toml").write_text("max_train_steps = 7\n")
    config = parse_config(["--config_file", str(tmp_path / "train")], **ARGS)
    assert config.max_train_steps == 7


def test_yaml_numeric_strings_are_numbers(tmp_path: Path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("optimizer:\n  learning_rate: 1e-4\nnetwork_dim: 8\ncache_latents: true\n")
    values = load_config_file(cfg)
    assert values == {"learning_rate": 1e-4, "network_dim": 8, "cache_latents": True}


def test_unknown_and_mistyped_keys_reported_together(tmp_path: Path):
    cfg = tmp_path / "train.toml"
    cfg.write_text('learning_rat = 1e-4\nnetwork_dim = "big"\nmax_train_steps = 5\n')
    with pytest.raises(UserError) as err:
        load_config_file(cfg)
    assert err.value.problems == [
        f"{cfg}: unknown option 'learning_rat' (did you mean \"learning_rate\"?)",
        f"{cfg}: network_dim must be an integer, got 'big'",
    ]


def test_toml_syntax_error_names_file(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("learning_rate = = 1\n")
    with pytest.raises(UserError) as err:
        load_config_file(cfg)
    assert err.value.problems == [
        f'{cfg}:1: TOML syntax error: Invalid value (column 17); values must be "quoted strings", numbers, '
        "true/false or [lists]"
    ]


def test_unknown_cli_flag_suggests():
    with pytest.raises(UserError) as err:
        parse_config(["--netwrok_dim", "4"], **ARGS)
    assert err.value.problems == ['command line: unknown flag --netwrok_dim (did you mean "--network_dim"?)']


def test_output_config_roundtrip_and_no_overwrite(tmp_path: Path):
    config = parse_config(
        ["--learning_rate", "1e-4", "--network_dim", "8", "--network_args", "conv_dim=2"], **ARGS
    )
    out = tmp_path / "resolved.toml"
    write_output_config(config, out)
    again = parse_config(["--config_file", str(out)], **ARGS)
    assert (again.learning_rate, again.network_dim, again.network_args) == (1e-4, 8, ["conv_dim=2"])
    with pytest.raises(UserError, match="already exists"):
        write_output_config(config, out)


def test_resolution_parsing():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("512,768") == (512, 768)
    with pytest.raises(UserError, match="--resolution"):
        parse_resolution("big")


def test_validate_reports_everything_at_once(tmp_path: Path):
    config = parse_config(
        [
            "--pretrained_model_name_or_path",
            str(tmp_path / "nope"),
            "--train_data_dir",
            str(tmp_path / "imgs"),
            "--network_train_unet_only",
            "--network_train_text_encoder_only",
            "--optimizer_type",
            "Adamm",
            "--lr_scheduler",
            "cosin",
            "--learning_rate",
            "-1",
        ],
        **ARGS,
    )
    problems = validate(config)
    assert (
        f"--pretrained_model_name_or_path: model {tmp_path / 'nope'} does not exist; pass a local diffusers "
        "folder or .safetensors/.ckpt file (hub ids are not downloaded)"
    ) in problems
    assert "--output_dir is required (the folder where LoRA files are written)" in problems
    assert f"--train_data_dir: folder {tmp_path / 'imgs'} does not exist; check the path" in problems
    assert "--resolution is required with --train_data_dir (e.g. --resolution 512)" in problems
    assert "--learning_rate must not be negative, got -1.0" in problems
    assert any(
        p.startswith("--network_train_unet_only and --network_train_text_encoder_only") for p in problems
    )
    assert any(p.startswith("--optimizer_type: unknown optimizer 'Adamm'") for p in problems)
    assert any(
        p.startswith("--lr_scheduler: unknown scheduler 'cosin' (did you mean \"cosine\"?)") for p in problems
    )


def test_pending_kohya_options_accepted_at_default_and_refused_otherwise(tmp_path: Path):
    config = parse_config(["--ddp_timeout", "None", "--deepspeed=false", "--max_train_steps", "5"], **ARGS)
    assert config.max_train_steps == 5
    with pytest.raises(UserError) as err:
        parse_config(["--ddp_timeout", "30", "--deepspeed", "--max_train_steps", "5"], **ARGS)
    assert err.value.problems == [
        "command line: --ddp_timeout is a kohya option this version does not implement yet; remove it "
        "(ignoring it would train something other than what you asked for)",
        "command line: --deepspeed is a kohya option this version does not implement yet; remove it "
        "(ignoring it would train something other than what you asked for)",
    ]
    cfg = tmp_path / "kohya.toml"
    cfg.write_text("ddp_timeout = 30\ncaption_dropout_rate = 0.0\nddp_static_graph = false\n")
    with pytest.raises(UserError) as err:
        load_config_file(cfg)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(f"{cfg}: ddp_timeout is a kohya")

"""The one typed training config: kohya flag names and defaults, merged from CLI, TOML and YAML.

Order of precedence (kohya's): explicit CLI flag > `--config_file` value > default. Unlike kohya, an unknown
key in a config file or an unknown flag is an error with a "did you mean" suggestion, and every problem is
reported at once. Nothing below the entry scripts takes this object whole: `library.training.run` reads it
and passes plain values down.
"""

from library.config.loss import HUBER_SCHEDULES, LOSS_TYPES, LossNoiseOptions
from library.config.options import GROUPS, TrainConfig, default_of, flag
from library.config.parse import (
    build_parser,
    coerce_value,
    config_as_json,
    load_config_file,
    loggable_options,
    non_default_values,
    parse_config,
    print_help_and_exit,
    write_output_config,
)

__all__ = [
    "GROUPS",
    "HUBER_SCHEDULES",
    "LOSS_TYPES",
    "LossNoiseOptions",
    "TrainConfig",
    "build_parser",
    "coerce_value",
    "config_as_json",
    "default_of",
    "flag",
    "load_config_file",
    "loggable_options",
    "non_default_values",
    "parse_config",
    "print_help_and_exit",
    "write_output_config",
]

"""Loss bookkeeping (kohya's moving average), a tqdm bar, and TensorBoard/wandb scalars."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

# The --scale_weight_norms statistics as logged (kohya's tags), in the order `max_norm_stats` returns them.
MAX_NORM_KEYS = ("max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm")


class LossAverage:
    """kohya's moving average: the mean of the most recent `window` step losses."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=max(1, window))

    def add(self, value: float) -> float:
        self.values.append(value)
        return sum(self.values) / len(self.values)


class Logger:
    """TensorBoard (when a logging dir is set and `log_with` is None, tensorboard or all) and wandb (`log_with`
    wandb or all; an optional package, checked before training); otherwise a no-op."""

    def __init__(
        self,
        logging_dir: str | None,
        prefix: str | None,
        started: str,
        *,
        log_with: str | None = None,
        tracker_name: str | None = None,
        config: dict[str, Any] | None = None,
        wandb_options: dict[str, Any] | None = None,
    ) -> None:
        """`wandb_options`: extra wandb.init() options (run name, --log_tracker_config's [wandb] table) and
        `api_key` for a login first."""
        self.writer = self.wandb = None
        if logging_dir and log_with in (None, "tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(logging_dir) / f"{prefix or ''}{started}"
            self.writer = SummaryWriter(log_dir=str(run_dir))
            self.run_dir = run_dir
            if config:
                import json

                self.writer.add_text("config", json.dumps(config, indent=1, default=str), 0)
        if log_with in ("wandb", "all") and (logging_dir or log_with == "wandb"):
            import wandb

            options = dict(wandb_options or {})
            api_key = options.pop("api_key", None)
            if api_key:
                wandb.login(key=api_key)
            # kohya's default project name for LoRA training; the tracker config file may override anything.
            init = {"project": tracker_name or "network_train", "config": config, "dir": logging_dir}
            self.wandb = wandb.init(**{**init, "reinit": True, **options})

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """A PIL image (a sample) under `tag`."""
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

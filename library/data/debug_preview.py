"""`--debug_dataset`: show what training would see, sample by sample, without training.

kohya prints each sample and opens a window per image; here each sample is printed (image, final caption,
sizes, crop, flip) and the exact tensor the model would get is saved as a PNG, so the check also works on
a headless machine and the files can be compared side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from library.data.dataset import DatasetGroup


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] (what the model gets) -> an 8-bit RGB image."""
    array = ((pixels.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()), "RGB")


def write_debug_previews(
    group: DatasetGroup, folder: Path, *, epochs: int = 1, echo: Callable[[str], None] = print
) -> int:
    """Load every batch of the first `epochs` epochs as training would; print each sample and save its
    pixels as `<folder>/e<epoch>-b<batch>-<i>-<image name>.png`. Returns the number of files written."""
    folder.mkdir(parents=True, exist_ok=True)
    batches, written = group.num_batches_per_epoch, 0
    for epoch in range(epochs):
        echo(f"epoch {epoch + 1}: {batches} batches")
        for step in range(batches):
            batch = group.load_batch(epoch, step)
            for i, path in enumerate(batch["image_paths"]):
                height, width = batch["target_sizes_hw"][i].tolist()
                orig_h, orig_w = batch["original_sizes_hw"][i].tolist()
                top, left = batch["crop_top_lefts"][i].tolist()
                echo(
                    f"  batch {step + 1}/{batches} #{i}: {path}  {orig_w}x{orig_h} -> {width}x{height}, "
                    f"crop top-left ({top}, {left}), flipped {batch['flipped'][i]}, "
                    f'loss weight {batch["loss_weights"][i].item():g}, caption: "{batch["captions"][i]}"'
                )
                if batch["images"] is None:  # served from a latent cache: there are no pixels to show
                    continue
                name = f"e{epoch + 1:02d}-b{step + 1:05d}-{i}-{Path(path).stem}.png"
                tensor_to_image(batch["images"][i]).save(folder / name)
                written += 1
    return written

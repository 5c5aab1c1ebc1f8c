"""Generate the tiny sample dataset used by the quickstart (run once; the output is committed).

    python examples/sample_dataset/make_images.py

Writes simple coloured shapes on white into `img/10_sks shape/` (kohya DreamBooth layout: 10 repeats, class
tokens "sks shape", one .caption file per image) and a few class images without captions into
`reg/1_shape/` (their caption is the folder's class tokens). Mixed aspect ratios exercise bucketing.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# (file stem, width, height, colour, shape)
TRAIN = [
    ("red_circle", 64, 64, "red", "circle"),
    ("blue_square", 96, 64, "blue", "square"),
    ("green_triangle", 64, 96, "green", "triangle"),
    ("yellow_circle", 80, 64, "yellow", "circle"),
    ("purple_square", 64, 80, "purple", "square"),
    ("orange_triangle", 96, 96, "orange", "triangle"),
    ("blue_circle", 96, 64, "blue", "circle"),
    ("red_square", 64, 64, "red", "square"),
]
REG = [
    ("shape_1", 64, 64, "gray", "circle"),
    ("shape_2", 64, 64, "black", "square"),
    ("shape_3", 64, 64, "gray", "triangle"),
]


def draw(width: int, height: int, colour: str, shape: str) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    side = min(width, height) * 0.6
    cx, cy = width / 2, height / 2
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def main() -> None:
    train_dir = HERE / "img" / "10_sks shape"
    reg_dir = HERE / "reg" / "1_shape"
    for folder in (train_dir, reg_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for stem, width, height, colour, shape in TRAIN:
        draw(width, height, colour, shape).save(train_dir / f"{stem}.png", optimize=True)
        caption = f"sks shape, {colour} {shape}, white background\n"
        (train_dir / f"{stem}.caption").write_text(caption, encoding="utf-8")
    for stem, width, height, colour, shape in REG:
        draw(width, height, colour, shape).save(reg_dir / f"{stem}.png", optimize=True)


if __name__ == "__main__":
    main()

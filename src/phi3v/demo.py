"""`phi3v demo`: the official tutorial's three tasks on freshly drawn images, end to end.

Until a trained small model ships, the demo runs a tiny random-weight checkpoint: every stage of the
pipeline (image processing, CLIP, HD transform, projector, decoder, sampling, detokenizing) really runs,
but the answers are noise.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

TASKS = (
    ("chart.png", "What is shown in this chart? Which bar is the tallest?"),
    ("cover.png", "What is the title of this book, and who is the author?"),
    (("scene_a.png", "scene_b.png"), "What is different between the two images?"),
)


def draw_chart(path: Path) -> None:
    img = Image.new("RGB", (480, 320), "white")
    d = ImageDraw.Draw(img)
    for i, (label, value) in enumerate([("A", 120), ("B", 220), ("C", 80), ("D", 160)]):
        x = 60 + i * 100
        d.rectangle([x, 280 - value, x + 60, 280], fill=(60, 110, 200))
        d.text((x + 25, 288), label, fill="black")
    d.line([40, 280, 460, 280], fill="black", width=2)
    img.save(path)


def draw_cover(path: Path) -> None:
    img = Image.new("RGB", (300, 450), (120, 30, 40))
    d = ImageDraw.Draw(img)
    d.text((60, 120), "THE PATIENT PIXEL", fill="white", font_size=22)
    d.text((95, 380), "by A. N. Author", fill=(240, 220, 160), font_size=16)
    img.save(path)


def draw_scene(path: Path, second: bool) -> None:
    img = Image.new("RGB", (400, 300), (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse([40, 60, 140, 160], fill="red")
    d.rectangle([220, 120, 320, 220], fill="blue" if not second else "green")
    img.save(path)


def draw_images(folder: Path) -> None:
    """Write the demo's images into `folder`."""
    draw_chart(folder / "chart.png")
    draw_cover(folder / "cover.png")
    draw_scene(folder / "scene_a.png", second=False)
    draw_scene(folder / "scene_b.png", second=True)

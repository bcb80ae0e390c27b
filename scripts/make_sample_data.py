"""Generate the bundled sample images and manifests (deterministic, Pillow only).

    python scripts/make_sample_data.py

Writes beam_caption/sample_data/images/*, beam_caption/sample_data/sample_data.json (image paths
relative to beam_caption/sample_data/) and data/image_caption/sample_data.json (paths relative to
the repository root). Every image is shifted so its mean colour on white sits on a distinct
multiple of 51 per channel: the fake VLM server derives distinct captions from it.
"""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "beam_caption" / "sample_data"
IMAGE_DIR = SAMPLE_DIR / "images"
REPO_MANIFEST = ROOT / "data" / "image_caption" / "sample_data.json"
WHITE = (255, 255, 255)


def on_white(img: Image.Image) -> Image.Image:
    """The image as a viewer (and the fake server) sees it: RGB, transparency on white."""
    if img.mode != "RGBA":
        return img.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), img).convert("RGB")


def calibrate(img: Image.Image, target: tuple[int, int, int]) -> Image.Image:
    """Shift the colour channels of an RGB / RGBA image until its mean on white is ``target``."""
    for _ in range(6):
        mean = ImageStat.Stat(on_white(img)).mean
        shifts = [round(t - m) for t, m in zip(target, mean)]
        if not any(shifts):
            break
        bands = list(img.split())
        for i, shift in enumerate(shifts):
            bands[i] = bands[i].point(lambda v, s=shift: min(255, max(0, v + s)))
        img = Image.merge(img.mode, bands)
    return img


def vertical_gradient(size: tuple[int, int], top: tuple, bottom: tuple) -> Image.Image:
    ramp = Image.linear_gradient("L").resize(size)
    return Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), ramp)


def noise(size: tuple[int, int], sigma: float, seed: int) -> Image.Image:
    """Gaussian noise around 128, one independent band per channel."""
    random.seed(seed)
    bands = []
    for _ in range(3):
        data = bytes(min(255, max(0, round(random.gauss(128, sigma))))
                     for _ in range(size[0] * size[1]))
        bands.append(Image.frombytes("L", size, data))
    return Image.merge("RGB", bands)


def landscape() -> Image.Image:
    """Sky gradient, sun, two rolling hills."""
    size = (640, 400)
    img = vertical_gradient(size, (70, 130, 220), (190, 220, 250))
    draw = ImageDraw.Draw(img)
    draw.ellipse((470, 50, 550, 130), fill=(255, 220, 90))
    for y0, colour in ((250, (80, 150, 70)), (290, (50, 120, 50))):
        points = [(x, y0 + 30 * math.sin(x / 70 + y0)) for x in range(0, size[0] + 10, 10)]
        draw.polygon(points + [(size[0], size[1]), (0, size[1])], fill=colour)
    return img.filter(ImageFilter.GaussianBlur(1))


def lighthouse_portrait() -> Image.Image:
    """A tall lighthouse against a sunset sky (portrait as displayed)."""
    size = (320, 480)
    img = vertical_gradient(size, (240, 140, 60), (150, 90, 110))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 400, 320, 480), fill=(60, 70, 110))
    draw.polygon([(140, 120), (180, 120), (195, 400), (125, 400)], fill=(235, 230, 220))
    for y in (180, 260, 340):
        draw.rectangle((130, y, 190, y + 25), fill=(200, 40, 40))
    draw.rectangle((145, 95, 175, 120), fill=(255, 240, 150))
    return img


def sticker() -> Image.Image:
    """A red heart-like sticker on a transparent background."""
    img = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 20, 160, 170), fill=(220, 30, 50, 255))
    draw.ellipse((140, 20, 290, 170), fill=(220, 30, 50, 255))
    draw.polygon([(18, 125), (282, 125), (150, 290)], fill=(220, 30, 50, 255))
    draw.ellipse((50, 50, 95, 85), fill=(255, 200, 200, 160))
    return img


def spinner_frames() -> list[Image.Image]:
    """Two frames of a purple pinwheel."""
    frames = []
    for turn in range(2):
        img = Image.new("RGB", (200, 200), (120, 40, 200))
        draw = ImageDraw.Draw(img)
        for k in range(4):
            start = k * 90 + turn * 45
            draw.pieslice((20, 20, 180, 180), start, start + 45, fill=(200, 90, 240))
        frames.append(img)
    return frames


def flowers() -> Image.Image:
    """Pink blossoms scattered over leaves."""
    rng = random.Random(7)
    img = Image.new("RGB", (400, 300), (90, 140, 80))
    draw = ImageDraw.Draw(img)
    for _ in range(70):
        x, y, r = rng.randrange(400), rng.randrange(300), rng.randrange(12, 30)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(235, 110, 170))
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(250, 220, 80))
    return img.filter(ImageFilter.SMOOTH)


def xray16() -> Image.Image:
    """A 16-bit grayscale scan: a bright disc over a dark ramp, scaled to a mean of 102/255."""
    width, height = 256, 192
    levels = [40 + 90 * x / width + max(0.0, 1 - math.hypot(x - 128, y - 96) / 80) * 120
              for y in range(height) for x in range(width)]
    scale = 102 * 257 / (sum(levels) / len(levels))
    values = [round(level * scale) for level in levels]
    return Image.frombytes("I;16", (width, height), struct.pack(f"<{len(values)}H", *values))


def icon() -> Image.Image:
    """A 16x16 green tick on dark green."""
    img = Image.new("RGB", (16, 16), (0, 90, 45))
    ImageDraw.Draw(img).line([(3, 8), (6, 12), (13, 3)], fill=(0, 200, 100), width=2)
    return img


def checkerboard() -> Image.Image:
    """Yellow and olive checkerboard, stored as an 8-bit palette."""
    img = Image.new("RGB", (160, 160), (60, 60, 0))
    draw = ImageDraw.Draw(img)
    for row in range(8):
        for col in range(row % 2, 8, 2):
            draw.rectangle((col * 20, row * 20, col * 20 + 19, row * 20 + 19), fill=(245, 245, 0))
    return img


def night_street() -> Image.Image:
    """A grainy, dark blue street scene with lit windows, like a high-ISO photo."""
    size = (800, 600)
    img = vertical_gradient(size, (20, 30, 80), (70, 60, 120))
    draw = ImageDraw.Draw(img)
    rng = random.Random(3)
    for x0 in range(0, 800, 160):
        top = rng.randrange(120, 260)
        draw.rectangle((x0 + 10, top, x0 + 150, 600), fill=(35, 40, 75))
        for _ in range(12):
            wx, wy = rng.randrange(x0 + 20, x0 + 130), rng.randrange(top + 10, 560)
            draw.rectangle((wx, wy, wx + 12, wy + 16), fill=(230, 200, 120))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    return ImageChops.add(img, noise(size, 6, seed=11), offset=-128)


def orange_wall() -> Image.Image:
    """Almost one flat colour: an orange wall with a small dark window."""
    img = Image.new("RGB", (500, 300), (255, 110, 0))
    ImageDraw.Draw(img).rectangle((400, 40, 440, 90), fill=(120, 60, 20))
    return img


def save_images() -> dict[str, str]:
    """Write every image; returns {file name: what it shows}."""
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    shown = {}

    def save(name: str, img: Image.Image, what: str, **params) -> None:
        img.save(IMAGE_DIR / name, **params)
        shown[name] = what

    save("landscape.jpg", calibrate(landscape(), (102, 153, 204)), "hills under a sunny sky",
         quality=80)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored rotated 90 degrees counter-clockwise
    portrait = calibrate(lighthouse_portrait(), (204, 102, 102))
    save("lighthouse_exif6.jpg", portrait.transpose(Image.Transpose.ROTATE_90),
         "a lighthouse at sunset (portrait via EXIF orientation 6)", quality=80, exif=exif)
    save("sticker_alpha.png", calibrate(sticker(), (255, 153, 153)),
         "a red heart sticker on transparency", optimize=True)
    first, second = (calibrate(frame, (153, 51, 204)).quantize(8) for frame in spinner_frames())
    save("spinner.gif", first, "an animated purple pinwheel", save_all=True,
         append_images=[second], duration=300, loop=0)
    save("flowers.webp", calibrate(flowers(), (204, 102, 153)), "pink blossoms over leaves",
         quality=75)
    save("xray16.png", xray16(), "a 16-bit grayscale radial scan")
    save("icon16.png", calibrate(icon(), (0, 102, 51)), "a tiny tick icon")
    save("checkerboard.bmp", calibrate(checkerboard(), (153, 153, 0)).quantize(4),
         "a yellow checkerboard (palette BMP)")
    save("night_street.jpg", calibrate(night_street(), (51, 51, 102)),
         "a grainy night street with lit windows", quality=55)
    save("orange_wall.jpg", calibrate(orange_wall(), (255, 102, 0)), "a plain orange wall",
         quality=80)
    return shown


PROMPTS = [
    "Generate detailed captions based on image content.",
    "Describe this image in one sentence.",
    "What is shown in this picture? Mention the main colours.",
    "Write a short alt text for this image.",
    "Describe the scene, the lighting and the mood.",
    "List the objects you can see.",
    "Give a concise, factual caption suitable for a dataset.",
    "What shapes and patterns appear in this image?",
    "Describe this image for someone who cannot see it.",
    "Caption this image in under fifteen words.",
]


def records(prefix: str) -> list[dict]:
    """Seed-format records, one per image, plus a two-image record; paths start with prefix."""
    names = sorted(p.name for p in IMAGE_DIR.iterdir())
    out = []
    for i, (name, prompt) in enumerate(zip(names, PROMPTS)):
        record = {"image": [f"{prefix}images/{name}"],
                  "conversation": [{"from": "human", "value": prompt}]}
        if i == 0:
            record = {"id": "sample-plain-string", "image": f"{prefix}images/{name}",
                      "conversation": record["conversation"]}
        out.append(record)
    out.append({"image": [f"{prefix}images/landscape.jpg", f"{prefix}images/lighthouse_exif6.jpg"],
                "conversation": [{"from": "human",
                                  "value": "Compare these two images: what differs?"}]})
    return out


def write_json(path: Path, data: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    for name, what in save_images().items():
        print(f"{(IMAGE_DIR / name).stat().st_size:7d} B  {name}: {what}")
    write_json(SAMPLE_DIR / "sample_data.json", records(""))
    write_json(REPO_MANIFEST, records("beam_caption/sample_data/"))


if __name__ == "__main__":
    main()

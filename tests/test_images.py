"""Tests for beam_caption.core.images: paths, reading, decoding, conversion, resizing, errors."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
from pathlib import Path

import fsspec
import pytest
from PIL import Image, ImageFile, ImageStat

from beam_caption.core import images
from beam_caption.core.errors import CaptionError
from beam_caption.core.images import (
    ImageSettings,
    PreparedImage,
    prepare_image,
    prepare_image_bytes,
    read_image_bytes,
    resolve_image_path,
)

SAMPLE_DIR = Path(images.__file__).parents[1] / "sample_data"
REPO_ROOT = Path(__file__).resolve().parents[1]


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB image with far more than 256 colours (so it is sent as JPEG)."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))


def decoded(prepared: PreparedImage) -> Image.Image:
    header, payload = prepared.data_url.split(",", 1)
    assert header == f"data:{prepared.mime};base64"
    data = base64.b64decode(payload)
    assert len(data) == prepared.encoded_bytes
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (prepared.width, prepared.height)
    return img


DEFAULT_SETTINGS = ImageSettings()


def prepare(img: Image.Image, fmt: str, settings: ImageSettings = DEFAULT_SETTINGS,
            **params) -> tuple[PreparedImage, Image.Image]:
    prepared = prepare_image_bytes(encode(img, fmt, **params), settings)
    return prepared, decoded(prepared)


def error_of(call, *args) -> CaptionError:
    with pytest.raises(CaptionError) as info:
        call(*args)
    assert info.value.stage == "image"
    return info.value


# --- resolve_image_path


@pytest.mark.parametrize("path, root, expected", [
    ("a/b.jpg", "/data/imgs", "/data/imgs/a/b.jpg"),
    ("./a/../b.jpg", "/data/imgs/", "/data/imgs/b.jpg"),
    ("/abs/c.png", "/data/imgs", "/abs/c.png"),
    ("/abs/c.png", "gs://bucket/dir", "/abs/c.png"),
    ("a/b.jpg", "gs://bucket/dir", "gs://bucket/dir/a/b.jpg"),
    ("a/b.jpg", "gs://bucket/dir/", "gs://bucket/dir/a/b.jpg"),
    ("../x/b.jpg", "s3://bucket/dir/sub", "s3://bucket/dir/x/b.jpg"),
    ("b.jpg", "https://host/images", "https://host/images/b.jpg"),
    ("gs://other/b.jpg", "/data", "gs://other/b.jpg"),
    ("https://host/b.jpg?sig=1", "gs://bucket", "https://host/b.jpg?sig=1"),
    ("memory://x/b.jpg", "", "memory://x/b.jpg"),
    ("file:///tmp/b.jpg", "/data", "file:///tmp/b.jpg"),
])
def test_resolve_image_path(path, root, expected):
    assert resolve_image_path(path, root) == expected


def test_resolve_image_path_expands_home():
    home = os.path.expanduser("~")
    assert resolve_image_path("~/b.jpg", "/data") == os.path.join(home, "b.jpg")
    assert resolve_image_path("b.jpg", "~/imgs") == os.path.join(home, "imgs", "b.jpg")


@pytest.mark.parametrize("path", ["", "   ", None])
def test_resolve_empty_path(path):
    assert error_of(resolve_image_path, path, "/data").type == "empty_image_path"


# --- reading


def test_read_local_and_memory(tmp_path):
    data = encode(noisy((40, 30)), "JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    assert read_image_bytes(str(tmp_path / "a.jpg"), 10**6) == data
    with fsspec.open("memory://test_images/a.jpg", "wb") as f:
        f.write(data)
    prepared = prepare_image("memory://test_images/a.jpg", ImageSettings())
    assert (prepared.width, prepared.height, prepared.source_bytes) == (40, 30, len(data))


def test_read_errors(tmp_path):
    missing = error_of(read_image_bytes, str(tmp_path / "nope.jpg"), 100)
    assert (missing.type, missing.retryable) == ("image_not_found", False)
    assert error_of(read_image_bytes, "memory://test_images/nope.jpg", 100).type == \
        "image_not_found"
    assert error_of(read_image_bytes, str(tmp_path), 100).type == "image_not_a_file"
    unknown = error_of(read_image_bytes, "nosuchprotocol://x/y.jpg", 100)
    assert (unknown.type, unknown.retryable) == ("image_read_error", False)


def test_local_reads_expand_home_and_refuse_special_files(tmp_path, monkeypatch):
    data = encode(noisy((40, 30)), "JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_image_bytes("~/a.jpg", 10**6) == data
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it would block until a writer appears
    fifo = error_of(read_image_bytes, str(tmp_path / "fifo.jpg"), 100)
    assert fifo.type == "image_not_a_file" and "not a regular file" in fifo.message
    assert error_of(read_image_bytes, "/dev/null", 100).type == "image_not_a_file"


def test_a_wrong_reported_size_never_reads_past_the_limit():
    error = error_of(read_image_bytes, "file:///dev/zero", 100)  # fsspec reports size 0
    assert error.type == "image_too_large"


def test_read_too_large_known_size(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    error = error_of(read_image_bytes, str(tmp_path / "big.jpg"), 100)
    assert error.type == "image_too_large" and not error.retryable
    assert "101" in error.message and "100" in error.message
    assert read_image_bytes(str(tmp_path / "big.jpg"), 101) == b"x" * 101


def test_read_too_large_unknown_size(monkeypatch):
    monkeypatch.setattr(images.fsspec, "open", lambda url, mode: io.BytesIO(b"x" * 500))
    error = error_of(read_image_bytes, "gs://bucket/stream.jpg", 100)
    assert error.type == "image_too_large" and "more than 100" in error.message
    assert read_image_bytes("gs://bucket/stream.jpg", 500) == b"x" * 500


def test_read_errors_hide_url_secrets(monkeypatch):
    url = "gs://user:pw@host/a.jpg?X-Goog-Signature=secret"  # http(s): test_http_images.py

    class Broken:
        def __enter__(self):
            raise ConnectionResetError(f"reset while reading {url}")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(images.fsspec, "open", lambda url, mode: Broken())
    error = error_of(read_image_bytes, url, 100)
    assert (error.type, error.retryable) == ("image_read_error", True)
    assert "secret" not in error.message and "pw" not in error.message
    assert "gs://REDACTED@host/a.jpg?REDACTED" in error.message


# --- orientation, modes, frames


def test_exif_orientation_6_rotates():
    img = Image.new("RGB", (400, 200), (255, 0, 0))
    img.paste((0, 0, 255), (200, 0, 400, 200))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6
    img.paste(noisy((20, 20)), (0, 0))  # enough colours to be sent as JPEG
    prepared, out = prepare(img, "JPEG", exif=exif)
    assert (prepared.width, prepared.height) == (200, 400)
    assert (prepared.source_width, prepared.source_height) == (200, 400)
    # Rotated clockwise: the stored left (red) half is now on top.
    top, bottom = out.getpixel((100, 100)), out.getpixel((100, 300))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_transparent_rgba_becomes_white():
    prepared, out = prepare(Image.new("RGBA", (50, 40), (10, 20, 30, 0)), "PNG")
    assert out.mode == "RGB" and out.getextrema() == ((255, 255), (255, 255), (255, 255))


def test_half_transparent_la_blends_on_white():
    _, out = prepare(Image.new("LA", (20, 20), (0, 128)), "PNG")
    assert all(abs(v - 127) <= 2 for v in out.getpixel((5, 5)))


def test_palette_transparency_becomes_white():
    img = Image.new("P", (30, 30), 1)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 15, 30))
    _, out = prepare(img, "GIF", transparency=0)
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((25, 5)) == (200, 0, 0)


def test_16_bit_gradient_is_scaled_not_clipped():
    values = [x * 257 for x in range(256)] * 8
    img = Image.frombytes("I;16", (256, 8), struct.pack(f"<{len(values)}H", *values))
    prepared, out = prepare(img, "PNG")
    assert Image.open(io.BytesIO(encode(img, "PNG"))).mode == "I;16"
    assert prepared.mime == "image/png"  # 256 grey levels: lossless, so values are exact
    row = [out.getpixel((x, 0))[0] for x in range(256)]
    assert row[0] == 0 and row[255] == 255 and row[128] == 128


def test_cmyk_jpeg_becomes_rgb():
    _, out = prepare(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")
    assert out.mode == "RGB"
    red, green, blue = out.getpixel((10, 10))
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_16_bit_tiff_modes_are_scaled(mode):
    values = [x * 257 for x in range(256)] * 4
    img = Image.frombytes("I;16B", (256, 4), struct.pack(f">{len(values)}H", *values))
    data = encode(img if mode == "I;16B" else img.convert("I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    out = decoded(prepare_image_bytes(data, ImageSettings()))
    assert [out.getpixel((x, 0))[0] for x in (0, 128, 255)] == [0, 128, 255]


def test_mpo_opens_through_jpeg():
    frames = [noisy((400, 200), seed) for seed in (1, 2)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    prepared = prepare_image_bytes(data, ImageSettings(max_side=100))
    assert (prepared.mime, prepared.width, prepared.height) == ("image/jpeg", 100, 50)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decoded(prepare_image_bytes(data, ImageSettings()))
    assert out.getpixel((20, 20)) == (255, 0, 0)


# --- resizing and encoding


@pytest.mark.parametrize("size, max_side, expected", [
    ((4000, 1000), 1024, (1024, 256)),
    ((1000, 4000), 1024, (256, 1024)),
    ((300, 200), 1024, (300, 200)),
    ((1500, 500), 0, (1500, 500)),
])
def test_resize_bound(size, max_side, expected):
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    prepared, _ = prepare(img, "JPEG", ImageSettings(max_side=max_side))
    assert (prepared.width, prepared.height) == expected
    assert (prepared.source_width, prepared.source_height) == size


def test_photo_is_sent_as_rgb_jpeg():
    prepared, out = prepare(noisy((640, 480)), "PNG", ImageSettings(max_side=320))
    assert prepared.mime == "image/jpeg" and out.format == "JPEG" and out.mode == "RGB"
    assert prepared.data_url.startswith("data:image/jpeg;base64,")
    assert (prepared.width, prepared.height) == (320, 240)


def test_jpeg_quality_is_used():
    data = encode(noisy((200, 200)), "PNG")
    low = prepare_image_bytes(data, ImageSettings(jpeg_quality=20))
    high = prepare_image_bytes(data, ImageSettings(jpeg_quality=95))
    assert low.encoded_bytes < high.encoded_bytes


def test_line_art_is_sent_as_png():
    img = Image.new("RGB", (300, 200), "white")
    img.paste((0, 0, 0), (50, 50, 250, 60))
    prepared, out = prepare(img, "PNG")
    assert prepared.mime == "image/png" and out.format == "PNG" and out.mode == "RGB"
    assert out.getpixel((100, 55)) == (0, 0, 0)


# --- image errors


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not a PNG\n")
    error = error_of(prepare_image, str(tmp_path / "notes.png"), ImageSettings())
    assert (error.type, error.retryable) == ("not_an_image", False)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert error_of(prepare_image, str(tmp_path / "empty.jpg"), ImageSettings()).type == \
        "empty_image_file"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_truncated_image(fmt):
    data = encode(noisy((200, 150)), fmt)
    error = error_of(prepare_image_bytes, data[:len(data) // 2], ImageSettings())
    assert (error.type, error.retryable) == ("truncated_image", False)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_webp_is_refused():
    data = encode(noisy((200, 150)), "WEBP")
    error = error_of(prepare_image_bytes, data[:len(data) // 2], ImageSettings())
    assert error.type in ("corrupt_image", "truncated_image") and not error.retryable


def test_decompression_bomb():
    data = encode(noisy((100, 50)), "PNG")
    error = error_of(prepare_image_bytes, data, ImageSettings(max_pixels=4999))
    assert (error.type, error.retryable) == ("decompression_bomb", False)
    assert prepare_image_bytes(data, ImageSettings(max_pixels=5000)).width == 100


def test_decompression_bomb_default_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    data = encode(noisy((100, 50)), "PNG")  # 1.25x the limit: Pillow only warns, we refuse
    with pytest.warns(Image.DecompressionBombWarning):
        assert error_of(prepare_image_bytes, data, ImageSettings()).type == "decompression_bomb"
    # Above 2x the limit Pillow refuses at open.
    big = encode(noisy((100, 100)), "PNG")
    assert error_of(prepare_image_bytes, big, ImageSettings()).type == "decompression_bomb"


def test_too_many_bytes(tmp_path):
    data = encode(noisy((100, 100)), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    error = error_of(prepare_image, str(tmp_path / "a.png"), ImageSettings(max_bytes=1000))
    assert error.type == "image_too_large"


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PPM"])
def test_unsupported_format(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    Image.new("RGB", (32, 32), "red").save(path, fmt)
    error = error_of(prepare_image, str(path), ImageSettings())
    assert (error.type, error.retryable) == ("unsupported_format", False)
    assert fmt in error.message


@pytest.mark.parametrize("kwargs", [{"max_side": -1}, {"max_bytes": 0}, {"jpeg_quality": 0},
                                    {"jpeg_quality": 101}, {"max_pixels": 0}])
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        ImageSettings(**kwargs)


# --- bundled sample data


def sample_images() -> list[Path]:
    return sorted((SAMPLE_DIR / "images").iterdir())


def test_sample_images_have_distinct_mean_colours():
    sizes = [path.stat().st_size for path in sample_images()]
    assert len(sizes) >= 8 and max(sizes) < 40_000 and sum(sizes) < 250_000
    seen = {}
    for path in sample_images():
        out = decoded(prepare_image(str(path), ImageSettings()))
        means = ImageStat.Stat(out).mean
        assert all(abs(m - round(m / 51) * 51) <= 15 for m in means), (path.name, means)
        seen[path.name] = tuple(round(m / 51) for m in means)
    assert len(set(seen.values())) == len(seen), seen


def test_sample_manifests_point_at_bundled_images():
    bundled = json.loads((SAMPLE_DIR / "sample_data.json").read_text())
    repo = json.loads((REPO_ROOT / "data" / "image_caption" / "sample_data.json").read_text())
    assert len(bundled) == len(repo)
    for in_package, in_repo in zip(bundled, repo, strict=True):
        paths = in_package["image"] if isinstance(in_package["image"], list) else [
            in_package["image"]]
        repo_paths = in_repo["image"] if isinstance(in_repo["image"], list) else [
            in_repo["image"]]
        assert in_package["conversation"] == in_repo["conversation"]
        for path, repo_path in zip(paths, repo_paths, strict=True):
            assert (SAMPLE_DIR / path).is_file()
            assert repo_path == f"beam_caption/sample_data/{path}"
    assert any(isinstance(r["image"], str) and "id" in r for r in bundled)
    assert any(isinstance(r["image"], list) and len(r["image"]) == 2 for r in bundled)

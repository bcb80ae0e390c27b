"""Image preparation: read (local files, http(s) behind the address guard, other storage
through fsspec), validate, orient, make RGB, resize, encode as a data URL.

Every problem raises ``CaptionError(stage="image")``; read failures that a later read can
cure (timeouts, storage and connection errors, HTTP 5xx and 429) are marked retryable.
"""

from __future__ import annotations

import base64
import io
import math
import os
import posixpath
import re
import stat
from dataclasses import dataclass

import fsspec
from PIL import ExifTags, Image, UnidentifiedImageError

from beam_caption.core.errors import CaptionError
from beam_caption.core.http_images import UrlGuard, fetch, is_http_url
from beam_caption.core.limits import MAX_IMAGE_BYTES
from beam_caption.core.redact import redact_url

# Formats Image.open may try. MPO (multi-picture JPEG) needs no entry: the JPEG plugin opens it,
# and Pillow 12 raises KeyError for "MPO" in ``formats``.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DEFAULT_HTTP_TIMEOUT_S = 60.0
_WHITE = (255, 255, 255)
# EXIF orientation -> transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = (5, 6, 7, 8)


@dataclass(frozen=True)
class ImageSettings:
    """How images are prepared.

    max_side: longest side sent, in pixels (0 keeps the size; images are never upscaled).
    max_bytes: source files larger than this are refused before they are read.
    jpeg_quality: JPEG quality of the encoded image (1-100).
    max_pixels: refuse images with more pixels (None: Pillow's ``Image.MAX_IMAGE_PIXELS``).
      Pillow itself refuses anything above 2x ``Image.MAX_IMAGE_PIXELS`` whatever this says.
    """

    max_side: int = 1024
    max_bytes: int = MAX_IMAGE_BYTES
    jpeg_quality: int = 85
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_side < 0:
            raise ValueError(f"max_side must be >= 0, got {self.max_side}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_pixels is not None and self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0 or None, got {self.max_pixels}")


@dataclass(frozen=True)
class PreparedImage:
    """An encoded image ready for a request; width/height as sent, source_* upright as stored."""

    data_url: str
    mime: str
    width: int
    height: int
    source_width: int
    source_height: int
    source_bytes: int
    encoded_bytes: int


def _error(code: str, message: str, retryable: bool = False) -> CaptionError:
    return CaptionError("image", code, message, retryable=retryable)


def resolve_image_path(path: str, image_root: str) -> str:
    """Where to read ``path``: URLs and absolute paths as given, relative ones under image_root."""
    if not isinstance(path, str) or not path.strip():
        raise _error("empty_image_path", f"image path must be a non-empty string, got {path!r}")
    if _URL.match(path):
        return path
    local = os.path.expanduser(path)
    if os.path.isabs(local):
        return local
    if _URL.match(image_root):
        scheme, rest = image_root.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.normpath(os.path.join(os.path.expanduser(image_root), local))


def read_image_bytes(url: str, max_bytes: int, timeout: float | None = None,
                     guard: UrlGuard | None = None) -> bytes:
    """The bytes at ``url`` (a local path, an http(s) URL or any fsspec URL), refusing more
    than max_bytes.

    http(s) URLs are fetched behind ``guard`` (by default one that refuses non-public
    addresses, see http_images.py) within ``timeout`` seconds (connect and total). Elsewhere a
    known size is checked before reading, and at most max_bytes + 1 bytes are ever read (a
    reported size can be wrong). Local paths are read with the builtin ``open``, far cheaper
    than fsspec's; FIFOs, devices and sockets are refused rather than read.
    """
    if is_http_url(url):
        return fetch(url, max_bytes, timeout or DEFAULT_HTTP_TIMEOUT_S, guard or UrlGuard())
    local = not _URL.match(url)
    if local:
        url = os.path.expanduser(url)
    shown = redact_url(url)

    def failed(code: str, e: BaseException, retryable: bool = False) -> CaptionError:
        return _error(code, f"{shown}: {type(e).__name__}: {str(e).replace(url, shown)}",
                      retryable)

    def too_large(size: str) -> CaptionError:
        return _error("image_too_large",
                      f"{shown} is {size} bytes, over the limit of {max_bytes} bytes")

    try:
        if local:  # stat before open: opening a FIFO would block
            status = os.stat(url)
            if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):
                raise _error("image_not_a_file",
                             f"{shown} is not a regular file (a FIFO, device or socket)")
        with open(url, "rb") if local else fsspec.open(url, "rb") as f:
            size = status.st_size if local else getattr(f, "size", None)
            if size is not None and size > max_bytes:
                raise too_large(str(size))
            data = f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise failed("image_not_found", e) from None
    except TimeoutError as e:
        raise failed("image_timeout", e, retryable=True) from None
    except IsADirectoryError as e:
        raise failed("image_not_a_file", e) from None
    except PermissionError as e:
        raise failed("image_forbidden", e) from None
    except OSError as e:
        raise failed("image_read_error", e, retryable=True) from None
    except (ValueError, ImportError) as e:  # unknown protocol, or its package is not installed
        raise failed("image_read_error", e) from None
    if len(data) > max_bytes:
        raise too_large(f"{len(data)}" if size is not None else f"more than {max_bytes}")
    return data


def _open(data: bytes) -> Image.Image:
    """Image.open restricted to ALLOWED_FORMATS, with its failures as CaptionErrors."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise _error("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        pass
    except Exception as e:  # a recognised header that is cut short or malformed
        raise _decode_error(e) from None
    try:  # Is it an image Pillow knows, in a format we do not accept?
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
    except Exception:
        raise _error("not_an_image", "not a recognised image file") from None
    raise _error("unsupported_format",
                 f"{fmt} images are not supported (accepted: {', '.join(ALLOWED_FORMATS)})")


def _decode_error(e: Exception) -> CaptionError:
    """truncated_image for data that ends early, corrupt_image for any other decoding failure."""
    text = str(e)
    if "truncated" in text.lower() or "broken data stream" in text:
        return _error("truncated_image", text)
    return _error("corrupt_image", f"{type(e).__name__}: {text}")


def _working_mode(img: Image.Image) -> Image.Image:
    """The image as RGB, RGBA, LA or L, the modes Pillow resizes well (alpha premultiplied)."""
    mode = img.mode
    transparent = "transparency" in img.info
    if mode in ("RGB", "L"):
        return img.convert(mode + "A") if transparent else img
    if mode in ("RGBA", "LA"):
        return img
    if mode in ("P", "PA"):
        return img.convert("RGBA" if transparent or mode == "PA" else "RGB")
    if mode.startswith("I;16") or mode == "I":  # 16-bit: scale 0..65535 to 0..255, do not clip
        if mode not in ("I", "I;16"):  # point() scales only these
            img = img.convert("I")
        return img.point(lambda v: v / 257).convert("L")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, F, ...


def _flatten(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode == "L":
        return img.convert("RGB")
    background = Image.new("RGB", img.size, _WHITE)
    background.paste(img, mask=img.getchannel("A"))
    return background


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # unreadable EXIF: show the image as stored
        return None


def _draft_size(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """The smallest size a JPEG may be decoded at so the resize still has >= max_side to work on."""
    longest = max(size)
    if not max_side or longest <= max_side:
        return None
    scale = max_side / longest
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def prepare_image_bytes(data: bytes, settings: ImageSettings) -> PreparedImage:
    """Validate and encode an image file's bytes: upright, RGB, longest side <= max_side.

    Animated images give their first frame. Sources with at most 256 colours after resizing
    (palettes, line art) are sent as PNG, everything else as JPEG.
    """
    if not data:
        raise _error("empty_image_file", "image file is empty (0 bytes)")
    with _open(data) as source:
        width, height = source.size
        limit = Image.MAX_IMAGE_PIXELS if settings.max_pixels is None else settings.max_pixels
        if limit is not None and width * height > limit:
            raise _error("decompression_bomb",
                         f"image has {width * height} pixels ({width}x{height}), "
                         f"over the limit of {limit}")
        draft = _draft_size(source.size, settings.max_side)
        if draft:
            source.draft("RGB", draft)  # JPEG: decode at 1/2, 1/4 or 1/8 scale; others: no-op
        try:
            source.load()
        except Exception as e:  # any decoder failure on untrusted data fails this image only
            raise _decode_error(e) from None
        orientation = _orientation(source)
        if orientation in _SWAPS_SIDES:
            width, height = height, width
        try:
            img = _working_mode(source)
        except ValueError as e:
            raise _error("unsupported_format", f"{source.format} mode {source.mode}: {e}") from None
        if settings.max_side:
            img.thumbnail((settings.max_side, settings.max_side), Image.Resampling.BOX)
        img = _flatten(img)
        if orientation in _ORIENTATION:  # after the resize: fewer pixels to move
            img = img.transpose(_ORIENTATION[orientation])
        mime, encoded = _encode(img, settings.jpeg_quality)
        return PreparedImage(
            data_url=f"data:{mime};base64,{base64.b64encode(encoded).decode('ascii')}",
            mime=mime, width=img.width, height=img.height, source_width=width,
            source_height=height, source_bytes=len(data), encoded_bytes=len(encoded))


def _encode(img: Image.Image, jpeg_quality: int) -> tuple[str, memoryview]:
    """PNG for images of at most 256 colours (palettes, line art), JPEG for the rest."""
    buffer = io.BytesIO()
    if img.getcolors(256) is not None:
        img.save(buffer, "PNG")
        return "image/png", buffer.getbuffer()
    img.save(buffer, "JPEG", quality=jpeg_quality)
    return "image/jpeg", buffer.getbuffer()


def prepare_image(url: str, settings: ImageSettings) -> PreparedImage:
    """Read the image at ``url`` and prepare it (see prepare_image_bytes)."""
    return prepare_image_bytes(read_image_bytes(url, settings.max_bytes), settings)

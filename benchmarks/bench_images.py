"""Image preparation cost, and what resizing saves in bytes and tokens (issue targets 5 and 6).

Test images are generated photo-like pictures (benchmarks/common.py ``photo``): colour gradients
and blurred shapes drawn at 1/8 scale and upsampled, 200 thin lines, and Gaussian luma noise of
sigma 6 levels; JPEGs and WebPs are saved at quality 90. Pure noise would be unrealistically
expensive to decode, flat colour unrealistically cheap.

- ``prepare_image_bytes`` (1024 px, JPEG q85) runs pinned to one core (``sched_setaffinity``):
  median of repeats after a warm-up, and a cProfile of where a 12 MP preparation goes.
- 200 photos (2000x1500 JPEGs, 8 distinct contents) go through the whole captioning stage
  (benchmarks/run_stage.py: read, prepare, request; fake server at 0 ms latency, unpinned) in a
  subprocess under ``taskset -c 0`` and ``taskset -c 0,1``.
- Bytes and tokens: one 12 MP photo sent with --max_image_side 1024 and 0 (full size); the fake
  server counts ceil(w/28) * ceil(h/28) tokens per image (as Qwen2-VL) plus ~len/4 per text.

    python benchmarks/bench_images.py [--quick]
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FakeVLM,
    Row,
    Spread,
    Stage,
    Table,
    elements,
    encode,
    load_note,
    parse_args,
    photo,
    stage_config,
    temp_dir,
    write_manifest,
    write_photo_copies,
)

from beam_caption.core.images import ImageSettings, _draft_size, prepare_image_bytes

SETTINGS = ImageSettings(max_side=1024, jpeg_quality=85)  # the CLI's defaults
TWELVE_MP = (4000, 3000)
SIZES = ((640, 480), (1920, 1080), TWELVE_MP)
FORMATS = ("JPEG", "PNG", "WEBP")
PHOTO_SIZE = (2000, 1500)
PATCH_PX = 28
RUN_STAGE = Path(__file__).resolve().with_name("run_stage.py")
PROFILED = {"load", "draft", "thumbnail", "resize", "reduce", "save", "b64encode", "getcolors",
            "getexif", "_working_mode", "_flatten", "transpose"}


@contextlib.contextmanager
def one_core():
    """Pin this process (and threads it starts) to core 0 for the block."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def prepare_ms(data: bytes, repeats: int) -> Spread:
    """Milliseconds per prepare_image_bytes(data) call, after one warm-up call."""
    prepare_image_bytes(data, SETTINGS)
    return Spread([_ms(prepare_image_bytes, data, SETTINGS) for _ in range(repeats)])


def decode_ms(data: bytes, repeats: int) -> Spread:
    """Milliseconds to only decode a JPEG at the reduced scale Pillow's draft() allows for
    a result of at least max_side: the floor for any preparation that has to decode it."""
    def decode():
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", _draft_size(img.size, SETTINGS.max_side))
            img.load()
    return Spread([_ms(decode) for _ in range(repeats)])


def _ms(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return 1000 * (time.perf_counter() - started)


def where_time_goes(data: bytes, repeats: int = 5) -> list[str]:
    """Pillow calls inside prepare_image_bytes, by cumulative ms per preparation (cProfile)."""
    profiler = cProfile.Profile()
    for _ in range(repeats):
        profiler.runcall(prepare_image_bytes, data, SETTINGS)
    found = [(entry[3] / repeats * 1000, f"{Path(file).name}:{name}")
             for (file, _, name), entry in pstats.Stats(profiler).stats.items()
             if name in PROFILED]
    return [f"{ms:6.1f} ms  {where}" for ms, where in sorted(found, reverse=True) if ms >= 0.5]


def twelve_megapixels(data: bytes, quick: bool, table: Table) -> None:
    """Target 5: a 12 MP photo-like JPEG to 1024 px JPEG q85 on one core, <= 80 ms."""
    repeats = 5 if quick else 15
    with one_core():
        prepared = prepare_image_bytes(data, SETTINGS)
        measured = prepare_ms(data, repeats)
        floor = decode_ms(data, repeats)
        profile = where_time_goes(data)
    table.rows.append(Row(f"12 MP JPEG ({len(data) / 1e6:.1f} MB) -> {prepared.width}x"
                          f"{prepared.height} JPEG q85, one core", measured, "ms",
                          ideal=floor.median, target=80, higher_is_better=False))
    table.notes.append(f"ideal = decoding alone at the draft scale: {floor} ms; one "
                       "preparation, cumulative per Pillow call (cProfile):")
    table.notes += ["    " + line for line in profile]


def formats_table(quick: bool) -> Table:
    """Images/s/core for JPEG, PNG and WebP sources at three sizes."""
    table = Table("Image preparation on one core: source -> 1024 px JPEG q85 (images/s/core)")
    with one_core():
        for width, height in SIZES:
            img = photo(width, height, seed=width)
            for fmt in FORMATS:
                data = encode(img, fmt)
                repeats = 3 if quick else (5 if width * height > 4e6 else 9)
                ms = prepare_ms(data, repeats)
                table.rows.append(Row(f"{fmt} {width}x{height} ({len(data) / 1e6:.2f} MB)",
                                      Spread([1000 / t for t in ms.values]), "images/s"))
                print(f"  {fmt} {width}x{height}: {ms} ms", flush=True)
    return table


def photo_stage(root: Path, quick: bool, table: Table) -> None:
    """200 photos through the captioning stage at latency 0 on one and on two cores."""
    count, repeats = (50, 1) if quick else (200, 3)
    paths = write_photo_copies(root / "photos", count, PHOTO_SIZE)
    with one_core():
        single_ms = prepare_ms(Path(paths[0]).read_bytes(), 9).median
    manifest = write_manifest(root / "photos.jsonl", paths, count)
    rates: dict[str, list[float]] = {"0": [], "0,1": []}
    with FakeVLM(["--latency_ms", "0"]) as vlm:
        for _ in range(repeats):
            for cpus, values in rates.items():  # interleaved, so drifting load hits both
                values.append(_stage_subprocess(cpus, vlm.url, manifest, root, count))
                print(f"  {count} photos, taskset -c {cpus}: {values[-1]:.1f} images/s",
                      flush=True)
    w, h = PHOTO_SIZE
    for cpus, values in rates.items():
        cores = len(cpus.split(","))
        table.rows.append(Row(f"{count} x {w}x{h} JPEG photos, captioning stage, 0 ms, "
                              f"taskset -c {cpus}", Spread(values), "images/s",
                              ideal=cores * 1000 / single_ms))
    one, two = Spread(rates["0"]).median, Spread(rates["0,1"]).median
    table.rows.append(Row("  speed-up from the second core", Spread([two / one]), "x", ideal=2))
    table.notes.append(f"photo-stage ideal = cores x one-core preparation rate ({single_ms:.0f} "
                       f"ms per {w}x{h} JPEG); the fake server is not pinned")


def _stage_subprocess(cpus: str, api_url: str, manifest: Path, root: Path, count: int) -> float:
    result = subprocess.run(
        ["taskset", "-c", cpus, sys.executable, str(RUN_STAGE), "--api_url", api_url,
         "--manifest", str(manifest), "--image_root", str(root)],
        capture_output=True, text=True, check=True)
    run = json.loads(result.stdout.strip().splitlines()[-1])
    if run["captioned"] != count:
        raise RuntimeError(f"captioned {run['captioned']} of {count} photos")
    return run["images_per_s"]


def bytes_and_tokens(root: Path, data: bytes, table: Table) -> None:
    """Target 6: data URL bytes and server-counted prompt tokens, 1024 px vs full size."""
    path = root / "twelve.jpg"
    path.write_bytes(data)
    sent, tokens, image_tokens = {}, {}, {}
    with FakeVLM(["--latency_ms", "0"]) as vlm:
        for side in (1024, 0):
            prepared = prepare_image_bytes(data, ImageSettings(max_side=side, jpeg_quality=85))
            sent[side] = len(prepared.data_url)
            image_tokens[side] = (math.ceil(prepared.width / PATCH_PX)
                                  * math.ceil(prepared.height / PATCH_PX))
            stage = Stage(stage_config(vlm.url, 1, str(root), "--max_image_side", str(side)))
            run = stage.run(elements([str(path)], 1, f"side{side}"))
            tokens[side] = run.outputs[0]["caption_meta"]["prompt_tokens"]
            table.rows += [
                Row(f"12 MP photo, --max_image_side {side}: data URL", Spread([sent[side] / 1e3]),
                    "kB"),
                Row(f"12 MP photo, --max_image_side {side}: prompt tokens",
                    Spread([tokens[side]]), "tokens", ideal=image_tokens[side]),
            ]
    table.rows += [
        Row("  bytes saved by 1024 px (full / 1024)", Spread([sent[0] / sent[1024]]), "x",
            ideal=(TWELVE_MP[0] * TWELVE_MP[1]) / (1024 * 768), target=10),
        Row("  tokens saved by 1024 px (full / 1024)", Spread([tokens[0] / tokens[1024]]), "x",
            ideal=image_tokens[0] / image_tokens[1024], target=10),
    ]
    table.notes.append("token ideal = image tokens alone, ceil(w/28) * ceil(h/28); bytes ideal = "
                       "the pixel ratio; target 10x = the README's 'an order of magnitude'")


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    table = Table("Image preparation (target 5) and bytes/tokens (target 6)")
    with temp_dir("images") as tmp:
        root = Path(tmp)
        twelve = encode(photo(*TWELVE_MP), "JPEG")
        print("target 5: 12 MP preparation", flush=True)
        twelve_megapixels(twelve, args.quick, table)
        print("formats x sizes", flush=True)
        formats = formats_table(args.quick)
        print("200 photos through the captioning stage", flush=True)
        photo_stage(root, args.quick, table)
        print("target 6: bytes and tokens", flush=True)
        bytes_and_tokens(root, twelve, table)
    table.notes.append(load_note())
    table.print()
    formats.print()


if __name__ == "__main__":
    main()

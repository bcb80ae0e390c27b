"""Datasets as input (issue 24): the same small JPEGs as loose files with a JSONL manifest, as
WebDataset shards (20) and as a Parquet table of embedded bytes (Hugging Face's Image struct,
row groups of 1,000), and the loose files + manifest and the shards again on
gcp-storage-emulator (gs://, shards read streaming), each captioned by ``python -m
beam_caption`` against the fake VLM server at 100 ms.

Every run is a subprocess (FnApiRunner, one ``--prompt`` for all, every image distinct, so the
request cache never answers), checked to caption every sample; images/s is summary.json's
(inside ``run()``), compared with the JSONL run of the same images and concurrency: the local
layouts with local JSONL, the gs:// shards with the gs:// JSONL (the emulator is a slow Python
server on the same cores; shards need one object read per shard, loose files one per image).
Peak RSS is the process tree's, polled every 50 ms, at N and 2N samples (C=64). The gs://
shards run gets an empty TMPDIR of its own, whose size is polled too: it holds only the live
progress file (~130 bytes), and a temp copy of a shard would add at least the smallest
shard's size.

    python benchmarks/bench_datasets.py [--quick] [--samples N] [--samples_c10 N]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from common import FakeVLM, PeakRss, Row, Spread, Table, load_note, run_cli, temp_dir
from PIL import Image, ImageDraw

from beam_caption.core.webdataset import write_sample

MIB = 2**20
LATENCY_MS = 100
SHARDS = 20
ROW_GROUP_ROWS = 1000
PROMPT = ("--prompt", "Describe the image.")
BUCKET = "bench-datasets"
_SIZES = ((96, 64), (64, 96), (96, 96), (128, 96))


def small_jpeg(i: int) -> bytes:
    """A small JPEG unique to ``i``: a colour of its own and ``i`` as a 24-bit bar code."""
    size = _SIZES[i % len(_SIZES)]
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    draw = ImageDraw.Draw(img)
    for bit in range(24):
        x = (bit % 12) * 5
        y = 8 + (bit // 12) * 6
        draw.rectangle((x, y, x + 4, y + 4), fill=(255, 255, 255) if i >> bit & 1 else (0, 0, 0))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class Layouts:
    """The first ``count`` images in the three layouts: ``manifest``, ``shards`` (a glob),
    ``table``."""

    def __init__(self, root: Path, images: list[bytes], count: int):
        root.mkdir(parents=True)
        self.count = count
        self.manifest = root / "manifest.jsonl"
        with open(self.manifest, "w", encoding="utf-8") as out:
            for i in range(count):
                out.write(json.dumps({"id": f"{i:09d}", "image": [_loose(root.parent, i)]})
                          + "\n")
        shard_dir = root / "shards"
        shard_dir.mkdir()
        per_shard = -(-count // SHARDS)
        for shard in range(SHARDS):
            with tarfile.open(shard_dir / f"{shard:05d}.tar", "w") as tar:
                for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                    key = f"{i:09d}"
                    write_sample(tar, key, {
                        "jpg": images[i], "json": json.dumps({"key": key}).encode(),
                        "txt": f"alt text {i}".encode()})
        self.shards = str(shard_dir / "*.tar")
        self.table = root / "table.parquet"
        with pq.ParquetWriter(self.table, pa.schema([
                ("key", pa.string()), ("text", pa.string()),
                ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])) as out:
            for first in range(0, count, ROW_GROUP_ROWS):
                rows = range(first, min(count, first + ROW_GROUP_ROWS))
                out.write_table(pa.Table.from_pylist([
                    {"key": f"{i:09d}", "text": f"alt text {i}",
                     "image": {"bytes": images[i], "path": f"{i:09d}.jpg"}} for i in rows]))


def _loose(root: Path, i: int) -> str:
    return str(root / "images" / f"{i:09d}.jpg")


def write_images(root: Path, count: int) -> list[bytes]:
    """``count`` distinct JPEGs, also written as loose files under ``root/images``."""
    (root / "images").mkdir(parents=True)
    images = [small_jpeg(i) for i in range(count)]
    if len(set(images)) != count:
        raise RuntimeError("the generated images are not all distinct: the cache would answer")
    for i, data in enumerate(images):
        Path(_loose(root, i)).write_bytes(data)
    return images


def upload_loose(fs, root: Path, count: int, prefix: str) -> str:
    """The first ``count`` loose images under ``gs://PREFIX/images/`` and a JSONL manifest of
    their gs:// URLs at ``gs://PREFIX/manifest.jsonl`` (returned)."""
    local = [_loose(root, i) for i in range(count)]
    # pipe_file: one upload request per image (put asks three more about each target first)
    for path in local:  # one at a time: the emulator serves one connection at a time
        fs.pipe_file(f"{prefix}/images/{Path(path).name}", Path(path).read_bytes())
    manifest = root / f"manifest-{prefix.replace('/', '-')}.jsonl"
    with open(manifest, "w", encoding="utf-8") as out:
        for i, path in enumerate(local):
            out.write(json.dumps({"id": f"{i:09d}",
                                  "image": [f"gs://{prefix}/images/{Path(path).name}"]}) + "\n")
    fs.put(str(manifest), f"{prefix}/manifest.jsonl")
    return f"gs://{prefix}/manifest.jsonl"


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path`` now."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.path.getsize(os.path.join(folder, name))
    return total


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with ``values`` added (so the CLI subprocess inherits them), then restored."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# gcp-storage-emulator's main, less its metadata file: after each object written it rewrites
# every object's metadata as indented JSON (in memory too, where only its start reads it back),
# so uploading N loose images costs N^2 (400 took 111 s); reads never write it.
_EMULATOR = """
import sys
from gcp_storage_emulator import __main__, storage
storage.Storage._write_config_to_file = lambda self: None
__main__.main(sys.argv[1:])
"""


@contextlib.contextmanager
def gcs_emulator(root: Path):
    """gcp-storage-emulator (in memory) on 127.0.0.1 with a bucket: the environment that points
    gcsfs at it, and a gcsfs filesystem on it."""
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        raise SystemExit("gcp-storage-emulator is not installed (the test extra has it)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(root / "gcp-storage-emulator.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", _EMULATOR, "start", "--host",
                                    "127.0.0.1", "--port", str(port), "--in-memory",
                                    "--default-bucket", BUCKET],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "gcp-storage-emulator.log").read_text()) from None
                time.sleep(0.1)
        # Beam asks google-auth for credentials: an unexpired token is used as it is
        credentials = root / "credentials.json"
        credentials.write_text(json.dumps({
            "type": "authorized_user", "client_id": "bench", "client_secret": "bench",
            "refresh_token": "bench", "token": "bench", "expiry": "2099-01-01T00:00:00Z"}))
        env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "FSSPEC_GCS_TOKEN": "anon",
               "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        with environment(env):
            yield fsspec.filesystem("gcs", endpoint_url=env["STORAGE_EMULATOR_HOST"],
                                    token="anon", skip_instance_cache=True)
    finally:
        process.terminate()
        process.wait(10)


def run(inputs, output: Path, vlm: FakeVLM, concurrency: int, count: int):
    """One CLI run over ``inputs``; checked to caption every sample, none from the cache."""
    result = run_cli(inputs, output, vlm.url, concurrency, output.parent, *PROMPT)
    summary = result.summary
    if summary["captioned"] != count or summary.get("failed") or summary.get("cache_hits"):
        raise RuntimeError(f"{output.name}: captioned {summary['captioned']} of {count}, "
                           f"failed {summary.get('failed')}, cache hits "
                           f"{summary.get('cache_hits')}: the figure would be wrong")
    print(f"  {output.name}: {summary['images_per_s']:.1f} images/s, process "
          f"{result.wall_s:.1f} s, peak RSS {result.tree_peak_rss / MIB:.0f} MiB", flush=True)
    return result


def throughput(layouts: Layouts, root: Path, concurrency: int, table: Table,
               rss: dict[str, dict[int, float]] | None = None) -> None:
    """images/s of each layout against JSONL at ``concurrency``; the shards also on gs://.
    ``rss``, when given, gets each layout's peak RSS (MiB) at this sample count."""
    count = layouts.count
    name = f"C={concurrency}, {count} samples"
    rates: dict[str, float] = {}
    with FakeVLM(["--latency_ms", str(LATENCY_MS)]) as vlm:
        for label, inputs in (("jsonl", layouts.manifest), ("shards", layouts.shards),
                              ("parquet", layouts.table)):
            result = run(inputs, root / f"c{concurrency}-{count}-{label}", vlm, concurrency,
                         count)
            rates[label] = result.summary["images_per_s"]
            if rss is not None:
                rss.setdefault(label, {})[count] = result.tree_peak_rss / MIB
        with gcs_emulator(root) as fs:
            prefix = f"{BUCKET}/c{concurrency}-{count}"
            started = time.perf_counter()
            manifest = upload_loose(fs, root, count, prefix)
            print(f"  uploaded {count} images and a manifest in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            result = run(manifest, root / f"c{concurrency}-{count}-gcs-jsonl", vlm,
                         concurrency, count)
            rates["gcs-jsonl"] = result.summary["images_per_s"]
            fs.put(str(Path(layouts.shards).parent) + "/", f"{prefix}/shards/", recursive=True)
            tmp = root / f"tmpdir-c{concurrency}-{count}"
            tmp.mkdir()
            with environment({"TMPDIR": str(tmp)}), PeakRss(tmp, dir_bytes) as temp_files:
                result = run(f"gs://{prefix}/shards/*.tar", root / f"c{concurrency}-{count}-gcs",
                             vlm, concurrency, count)
            rates["gcs-shards"] = result.summary["images_per_s"]
    ideal = concurrency * 1000 / LATENCY_MS
    table.rows.append(Row(f"{name}: loose files + JSONL", Spread([rates["jsonl"]]),
                          "images/s", ideal=ideal))
    for label, figure in (("shards", "WebDataset, 20 shards, local"),
                          ("parquet", "Parquet, embedded bytes, local")):
        table.rows.append(Row(f"  {figure} (ratio: / JSONL)", Spread([rates[label]]),
                              "images/s", ideal=rates["jsonl"], target=0.9 * rates["jsonl"]))
    table.rows += [
        Row(f"{name}: loose files + JSONL, gs:// emulator (ratio: / local JSONL)",
            Spread([rates["gcs-jsonl"]]), "images/s", ideal=rates["jsonl"]),
        Row("  WebDataset, 20 shards, gs:// emulator (ratio: / JSONL on gs://)",
            Spread([rates["gcs-shards"]]), "images/s", ideal=rates["gcs-jsonl"],
            target=0.9 * rates["gcs-jsonl"]),
        Row("  same (ratio: / local JSONL)", Spread([rates["gcs-shards"]]), "images/s",
            ideal=rates["jsonl"])]
    smallest = min(path.stat().st_size for path in Path(layouts.shards).parent.iterdir())
    table.rows.append(Row("  gs:// run: peak bytes under its TMPDIR (live progress file; "
                          "a shard copy would add a shard)", Spread([temp_files.peak]), "B",
                          target=smallest - 1, higher_is_better=False))


def memory(rss: dict[str, dict[int, float]], small: int, large: int, table: Table) -> None:
    """Peak RSS of each layout at ``small`` and ``large`` samples, and their ratio."""
    for label, figure in (("jsonl", "loose files + JSONL"), ("shards", "WebDataset shards"),
                          ("parquet", "Parquet, embedded bytes")):
        peaks = rss[label]
        table.rows += [
            *(Row(f"peak RSS, {figure}, {count} samples (C=64)", Spread([peaks[count]]), "MiB",
                  target=400e6 / MIB, higher_is_better=False) for count in (small, large)),
            Row(f"  RSS {large} / RSS {small}", Spread([peaks[large] / peaks[small]]), "x",
                ideal=1.0, target=1.3, higher_is_better=False),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 400 / 200 samples")
    parser.add_argument("--samples", type=int, default=100_000,
                        help="N, the samples of the C=64 runs (also run at 2N for memory)")
    parser.add_argument("--samples_c10", type=int,
                        help="the samples of the C=10 runs (default N; 100 images/s at best)")
    args = parser.parse_args()
    samples = 400 if args.quick else args.samples
    samples_c10 = 200 if args.quick else args.samples_c10 or samples
    table = Table(f"Datasets as input: images/s against JSONL ({LATENCY_MS} ms), peak RSS")
    with temp_dir("datasets") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        images = write_images(root, 2 * samples)
        sizes = {count: Layouts(root / f"n{count}", images, count)
                 for count in sorted({samples_c10, samples, 2 * samples})}
        print(f"data: {2 * samples} JPEGs of {sum(map(len, images)) / len(images):.0f} B on "
              f"average, written in {time.perf_counter() - started:.0f} s", flush=True)
        rss: dict[str, dict[int, float]] = {}
        print(f"C=10, {samples_c10} samples:", flush=True)
        throughput(sizes[samples_c10], root, 10, table)
        print(f"C=64, {samples} samples:", flush=True)
        throughput(sizes[samples], root, 64, table, rss)
        print(f"C=64, {2 * samples} samples (memory):", flush=True)
        with FakeVLM(["--latency_ms", str(LATENCY_MS)]) as vlm:
            layouts = sizes[2 * samples]
            for label, inputs in (("jsonl", layouts.manifest), ("shards", layouts.shards),
                                  ("parquet", layouts.table)):
                result = run(inputs, root / f"c64-{2 * samples}-{label}", vlm, 64, 2 * samples)
                rss[label][2 * samples] = result.tree_peak_rss / MIB
        memory(rss, samples, 2 * samples, table)
    table.notes += [
        f"one run per figure; small JPEGs 64-128 px, each distinct; {SHARDS} shards "
        f"(.jpg/.json/.txt per sample), Parquet row groups of {ROW_GROUP_ROWS} rows; "
        "images/s is summary.json's (inside run(), start-up excluded)",
        "RSS target 400 MB = 381 MiB; 'flat' = 2N / N within 1.3x (as bench_process.py)",
        load_note()]
    table.print()


if __name__ == "__main__":
    main()

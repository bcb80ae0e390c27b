"""``python -m beam_caption estimate``: what a job would send and cost, from its inputs and
its images' headers alone (no pixel is decoded, no request is sent).

The inputs are read as the job reads them (core/inputs.py): manifests, WebDataset shards
(streamed, each sample's image bytes in hand) and Parquet tables (row group by row group); a
read failure the job would have (a bad line, ``not_a_tar``, a sample without an image...) is
listed as "not counted", by stage and type. Each record is planned as the job would plan it
(its prompt turns, the system prompt); each image's size is read from its header (in the
bytes a shard or table carries, else in the file or URL its path names), shrunk as
``--max_image_side`` would, and counted with the chosen token formula (core/tokens.py).
Answers are counted at ``--expected_output_tokens``, or ``--max_tokens`` (the most a job can
pay), or 256.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
from PIL import Image

from beam_caption.cli.flag_table import NON_NEGATIVE_INT, add_caption_flags, split_inputs
from beam_caption.core.errors import CaptionError
from beam_caption.core.http_images import UrlGuard, fetch, is_http_url
from beam_caption.core.images import ImageSettings, resolve_image_path
from beam_caption.core.inputs import check_inputs, iter_unit, read_units
from beam_caption.core.manifest_reader import match_manifests
from beam_caption.core.prompts import load_prompts_file
from beam_caption.core.request import PromptSettings, image_paths, prompt_turns
from beam_caption.core.tokens import (
    DEFAULT_COMPLETION_TOKENS,
    default_max_side,
    image_tokens,
    text_tokens,
)

HEADER_THREADS = 32
BATCH = 1000  # records whose headers are read at a time
MAX_HEADER_BYTES = 50 * 2**20  # http(s) images are fetched whole (their header is in front)


@dataclass
class Estimate:
    """The totals ``estimate`` prints."""

    records: int = 0
    images: int = 0
    unreadable_records: int = 0  # a manifest line or an image that cannot be read: not counted
    image_tokens: int = 0
    text_tokens: int = 0
    output_tokens: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # "stage/type" -> records

    @property
    def input_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def cost(self, input_per_million: float, output_per_million: float) -> tuple[float, float]:
        """(input, output) cost at these prices per million tokens."""
        return (self.input_tokens * input_per_million / 1e6,
                self.output_tokens * output_per_million / 1e6)


# The job's flags estimate takes too (declared once, in the flag table).
JOB_FLAGS = ("input", "image_root", "image_key", "conversation_key", "system_prompt", "prompt",
             "prompts_file", "model", "max_image_side", "image_detail", "token_formula",
             "max_tokens", "price_per_million_input_tokens", "price_per_million_output_tokens",
             "batch_discount", "allow_private_urls")


def parser() -> argparse.ArgumentParser:
    """``estimate``'s flags: the job's own that shape what is sent and its price, in the job's
    ``--help`` groups, and ``--expected_output_tokens``."""
    parser = argparse.ArgumentParser(
        prog="python -m beam_caption estimate",
        description="Count the records, images, tokens and cost a caption job would have, "
                    "from the manifests and image headers alone (nothing is sent). Takes the "
                    "job's flags below; --model is only shown in the report.")
    parser.add_argument("--expected_output_tokens", type=NON_NEGATIVE_INT, default=None,
                        help="tokens an answer is expected to take (default: --max_tokens, "
                             f"else {DEFAULT_COMPLETION_TOKENS})")
    add_caption_flags(parser, only=JOB_FLAGS)
    return parser


def estimate(args: argparse.Namespace) -> Estimate:
    """Read every input record and image header named by ``args`` (``parser()``'s flags);
    UsageError, as the job's launch, for a table without the ``--image_key`` column."""
    files = match_manifests(split_inputs(args.input))
    check_inputs(files, args.image_key)
    prompts = PromptSettings(
        system_prompt=args.system_prompt or None, prompt=args.prompt, image_key=args.image_key,
        conversation_key=args.conversation_key,
        specs=load_prompts_file(args.prompts_file) if args.prompts_file else ())
    specs = prompts.prompt_specs("caption")
    root = args.image_root or os.getcwd()
    guard = UrlGuard(args.allow_private_urls)
    output_each = sum(args.expected_output_tokens or spec.max_tokens or args.max_tokens
                      or DEFAULT_COMPLETION_TOKENS for spec in specs)
    max_side = _max_side(args)
    totals = Estimate()

    def count(record: dict, images: list[bytes] | None) -> tuple[int, int, int]:
        """(images, image tokens, text tokens) of one record's requests (one per prompt), its
        images the bytes it carries when not None, else its paths; CaptionError when
        unreadable."""
        text = 0
        for spec in specs:
            turns = prompt_turns(record, prompts, spec)
            system = spec.system_prompt or prompts.system_prompt
            text += sum(len(t) for _, t in turns) + (
                len(system or "") if not any(r == "system" for r, _ in turns) else 0)
        if images is None:
            sizes = [_header_size(resolve_image_path(path, root), guard)
                     for path in image_paths(record, prompts.image_key)]
        else:
            sizes = [_bytes_size(data, f"image {i} of the record") for i, data in
                     enumerate(images)]
        sizes = [_sent_size(size, max_side) for size in sizes]
        tokens = sum(image_tokens(w, h, args.token_formula, args.image_detail) for w, h in sizes)
        return len(sizes), tokens * len(specs), text_tokens(text)

    def add(result: Callable[[], tuple[int, int, int]]) -> None:
        try:
            images, image_cost, text_cost = result()
        except CaptionError as exc:
            _problem(totals, exc.stage, exc.type)
            return
        totals.images += images
        totals.image_tokens += image_cost
        totals.text_tokens += text_cost
        totals.output_tokens += output_each

    with concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
        pending: list[concurrent.futures.Future] = []
        for element in _elements(files, prompts.image_key):  # streamed: memory stays flat
            totals.records += 1
            if "error" in element:  # a line, sample or row the job would fail at once
                _problem(totals, element["error"]["stage"], element["error"]["type"])
            elif "images" in element:  # bytes in hand: their headers read here, not held
                add(functools.partial(count, element["record"], element["images"]))
            else:
                pending.append(pool.submit(count, element["record"], None))
                if len(pending) >= BATCH:
                    for future in pending:
                        add(future.result)
                    pending = []
        for future in pending:
            add(future.result)
    return totals


def _elements(files: list[str], image_key: str) -> Iterator[dict]:
    """The keyed elements (records and read failures) of ``files``, as the job reads them."""
    for file in files:
        for unit in read_units(file):
            yield from iter_unit(unit, image_key, ImageSettings().max_bytes)


def _problem(totals: Estimate, stage: str, type_: str) -> None:
    totals.unreadable_records += 1
    key = f"{stage}/{type_}"
    totals.problems[key] = totals.problems.get(key, 0) + 1


def _header_size(url: str, guard: UrlGuard) -> tuple[int, int]:
    """An image's (width, height) from its header; CaptionError when it cannot be read."""
    with _header_errors(url):
        if is_http_url(url):
            return _bytes_size(fetch(url, MAX_HEADER_BYTES, 60.0, guard), url)
        with fsspec.open(url, "rb") as handle:
            return Image.open(handle).size  # reads the header, decodes nothing


def _bytes_size(data: bytes, shown: str) -> tuple[int, int]:
    """The (width, height) in the header of image bytes; CaptionError when it is none."""
    with _header_errors(shown):
        return Image.open(io.BytesIO(data)).size  # reads the header, decodes nothing


@contextlib.contextmanager
def _header_errors(shown: str) -> Iterator[None]:
    """Reading an image header's errors as the CaptionError the job would fail with."""
    try:
        yield
    except FileNotFoundError:
        raise CaptionError("image", "image_not_found", shown) from None
    except Image.DecompressionBombError as exc:
        raise CaptionError("image", "decompression_bomb", f"{shown}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise CaptionError("image", "not_an_image", f"{shown}: {type(exc).__name__}") from None


def _max_side(args: argparse.Namespace) -> int:
    """--max_image_side as the job would take it (its default depends on formula and detail)."""
    if args.max_image_side is None:
        return default_max_side(args.token_formula, args.image_detail)
    return args.max_image_side


def _sent_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def report(totals: Estimate, args: argparse.Namespace) -> list[str]:
    """The lines ``estimate`` prints."""
    input_cost, output_cost = totals.cost(args.price_per_million_input_tokens,
                                          args.price_per_million_output_tokens)
    counted = totals.records - totals.unreadable_records
    each = totals.output_tokens // counted if counted else 0
    lines = [
        f"estimate: {totals.records:,} records, {totals.images:,} images"
        f"{f' for {args.model}' if args.model else ''} (token formula {args.token_formula}, "
        f"image detail {args.image_detail or 'not sent'}, max image side "
        f"{_max_side(args) or 'unchanged'})",
        f"  input tokens:  {totals.input_tokens:,} = images {totals.image_tokens:,} + text "
        f"{totals.text_tokens:,}",
        f"  output tokens: {totals.output_tokens:,} ({each:,} per record)",
        f"  cost: ${input_cost:,.4f} input + ${output_cost:,.4f} output = "
        f"${input_cost + output_cost:,.4f} at ${args.price_per_million_input_tokens:g} / "
        f"${args.price_per_million_output_tokens:g} per million tokens",
    ]
    batch = (input_cost + output_cost) * args.batch_discount
    lines.append(f"  with --mode batch: ${batch:,.4f} (--batch_discount {args.batch_discount:g}"
                 f", saving ${input_cost + output_cost - batch:,.4f})")
    if totals.unreadable_records:
        lines.append(f"  not counted: {totals.unreadable_records:,} records that would fail (" +
                     ", ".join(f"{key}: {n}" for key, n in sorted(totals.problems.items())) + ")")
    return lines


def main(argv: list[str]) -> int:
    """The ``estimate`` command; prints ``report``'s lines."""
    flags = parser()
    args = flags.parse_args(argv)
    if not split_inputs(args.input):
        flags.error("the following arguments are required: --input")
    for line in report(estimate(args), args):
        print(line)
    return 0

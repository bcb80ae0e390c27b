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

Stages (core/stages.py) count at their own model's prices, a prompt with ``image: false``
without images, another prompt's answer in a prompt's text as long as that answer is
expected to be. How many records a judge sends to its re-caption model is known only once
the run has judged them: the estimate counts the worst case, every record asked again of the
re-caption model and judged again, and prints what each tenth of the records costs there.
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
from beam_caption.core.inputs import check_inputs, default_prompt, iter_unit, read_units
from beam_caption.core.manifest_reader import match_manifests
from beam_caption.core.prompts import PromptSpec, load_prompts_file
from beam_caption.core.request import PromptSettings, image_paths, prompt_turns
from beam_caption.core.stages import model_prices
from beam_caption.core.tokens import (
    CHARS_PER_TOKEN,
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
    # with prompts of other models: model (None: --model) -> [input, output] tokens
    by_model: dict[str | None, list[int]] = field(default_factory=dict)
    # the worst case counted for re-captions: model -> [input, output] tokens (all records)
    recaptions: dict[str, list[int]] = field(default_factory=dict)
    # image tokens of --model's requests that repeat an earlier request's image (the second
    # and later prompts of a record): what a server's prefix cache may serve
    cacheable_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def cost(self, input_per_million: float, output_per_million: float,
             prices: dict[str, list[float]] | None = None) -> tuple[float, float]:
        """(input, output) cost at these prices per million tokens, the tokens of other models
        at theirs (``prices``: model -> [input, output])."""
        input_cost = self.input_tokens * input_per_million / 1e6
        output_cost = self.output_tokens * output_per_million / 1e6
        for model, (input_tokens, output_tokens) in self.by_model.items():
            if model is not None:
                model_in, model_out = (prices or {}).get(model, (input_per_million,
                                                                  output_per_million))
                input_cost += input_tokens * (model_in - input_per_million) / 1e6
                output_cost += output_tokens * (model_out - output_per_million) / 1e6
        return input_cost, output_cost


# The job's flags estimate takes too (declared once, in the flag table).
JOB_FLAGS = ("input", "image_root", "image_key", "conversation_key", "system_prompt", "prompt",
             "prompts_file", "model", "max_image_side", "image_detail", "token_formula",
             "max_tokens", "price_per_million_input_tokens", "price_per_million_output_tokens",
             "price_per_million_cached_input_tokens",
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
    prompt = args.prompt or (None if args.prompts_file else default_prompt(files))
    prompts = PromptSettings(
        system_prompt=args.system_prompt or None, prompt=prompt, image_key=args.image_key,
        conversation_key=args.conversation_key,
        specs=load_prompts_file(args.prompts_file) if args.prompts_file else ())
    specs = prompts.prompt_specs("caption")
    root = args.image_root or os.getcwd()
    guard = UrlGuard(args.allow_private_urls)
    def answer_tokens(spec: PromptSpec, max_tokens: int | None = None) -> int:
        return (args.expected_output_tokens or max_tokens or spec.max_tokens or args.max_tokens
                or DEFAULT_COMPLETION_TOKENS)

    # another prompt's answer in a prompt's text: as long as that answer is expected to be
    answers = {spec.name: "x" * (answer_tokens(spec) * CHARS_PER_TOKEN) for spec in specs}
    max_side = _max_side(args)
    totals = Estimate()

    def count(record: dict, images: list[bytes] | None) -> tuple[int, int, int, dict]:
        """(images, image tokens, text tokens, tokens by model) of one record's requests (one
        per prompt, with the worst case of re-captions), its images the bytes it carries when
        not None, else its paths; CaptionError when unreadable."""
        texts = {}
        for spec in specs:
            turns = prompt_turns(record, prompts, spec, answers)
            system = spec.system_prompt or prompts.system_prompt
            texts[spec.name] = text_tokens(sum(len(t) for _, t in turns) + (
                len(system or "") if not any(r == "system" for r, _ in turns) else 0))
        if images is None:
            sizes = [_header_size(resolve_image_path(path, root), guard)
                     for path in image_paths(record, prompts.image_key)]
        else:
            sizes = [_bytes_size(data, f"image {i} of the record") for i, data in
                     enumerate(images)]
        sizes = [_sent_size(size, max_side) for size in sizes]
        tokens = sum(image_tokens(w, h, args.token_formula, args.image_detail) for w, h in sizes)
        by_model: dict[str | None, list[int]] = {}
        for spec, model, again in stage_requests:
            counts = by_model.setdefault(model, [0, 0, 0, 0])
            if spec.image and counts[0]:
                counts[3] += tokens  # the record's image again: a cacheable prefix
            counts[0] += tokens if spec.image else 0
            counts[1] += texts[spec.name]
            counts[2] += answer_tokens(spec, again)
        return len(sizes), sum(c[0] for c in by_model.values()), \
            sum(c[1] for c in by_model.values()), by_model

    def add(result: Callable[[], tuple[int, int, int, dict]]) -> None:
        try:
            images, image_cost, text_cost, by_model = result()
        except CaptionError as exc:
            _problem(totals, exc.stage, exc.type)
            return
        totals.images += images
        totals.image_tokens += image_cost
        totals.text_tokens += text_cost
        totals.cacheable_tokens += by_model.get(None, [0, 0, 0, 0])[3]
        for model, (model_images, model_text, model_output, _) in by_model.items():
            totals.output_tokens += model_output
            if len(by_model) > 1 or model is not None:
                counts = totals.by_model.setdefault(model, [0, 0])
                counts[0] += model_images + model_text
                counts[1] += model_output
        for model, (input_tokens, output_tokens) in recaption_share(by_model).items():
            counts = totals.recaptions.setdefault(model, [0, 0])
            counts[0] += input_tokens
            counts[1] += output_tokens

    # each request of a record: (prompt, model (None: --model), the answer's max_tokens if
    # its own); a judge's re-caption counted for every record (the worst case): the judged
    # prompt asked of the re-caption model, the judge asked again
    stage_requests: list[tuple[PromptSpec, str | None, int | None]] = [
        (spec, spec.route.model if spec.route else None, None) for spec in specs]
    by_name = {spec.name: spec for spec in specs}
    for judge in specs:
        if judge.recaption:
            judged = by_name[judge.judge_of]  # type: ignore[index]
            stage_requests += [(judged, judge.recaption.model, judge.recaption.max_tokens),
                               (judge, judge.route.model if judge.route else None, None)]

    recaption_models = {judge.recaption.model for judge in specs if judge.recaption}

    def recaption_share(by_model: dict) -> dict[str, list[int]]:
        """The re-caption model's tokens of a record (for the printed share)."""
        return {model: [counts[0] + counts[1], counts[2]] for model, counts in by_model.items()
                if model in recaption_models}

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
    specs = load_prompts_file(args.prompts_file) if args.prompts_file else ()
    prices = model_prices(specs, args.price_per_million_input_tokens,
                          args.price_per_million_output_tokens)
    input_cost, output_cost = totals.cost(args.price_per_million_input_tokens,
                                          args.price_per_million_output_tokens, prices)
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
        f"${args.price_per_million_output_tokens:g} per million tokens"
        + (" (other models at theirs)" if totals.by_model else ""),
    ]
    lines += _stage_lines(totals, args, prices)
    cached_price = args.price_per_million_cached_input_tokens
    if totals.cacheable_tokens and cached_price is not None:
        saved = totals.cacheable_tokens * (args.price_per_million_input_tokens - cached_price) / 1e6
        lines.append(
            f"  with the server's prefix cache: down to ${input_cost + output_cost - saved:,.4f} "
            f"({totals.cacheable_tokens:,} image tokens of the second and later prompts of "
            f"each image at ${cached_price:g} per million cached tokens)")
    batch = (input_cost + output_cost) * args.batch_discount
    lines.append(f"  with --mode batch: ${batch:,.4f} (--batch_discount {args.batch_discount:g}"
                 f", saving ${input_cost + output_cost - batch:,.4f})")
    if totals.unreadable_records:
        lines.append(f"  not counted: {totals.unreadable_records:,} records that would fail (" +
                     ", ".join(f"{key}: {n}" for key, n in sorted(totals.problems.items())) + ")")
    return lines


def _stage_lines(totals: Estimate, args: argparse.Namespace,
                 prices: dict[str, list[float]]) -> list[str]:
    """The lines of a job whose prompts ask other models: tokens and cost per model, and what
    the worst case counted for re-captions stands for."""
    def dollars(model: str | None, input_tokens: int, output_tokens: int) -> float:
        price_in, price_out = prices.get(model or "", (args.price_per_million_input_tokens,
                                                       args.price_per_million_output_tokens))
        return (input_tokens * price_in + output_tokens * price_out) / 1e6

    lines = [f"  {model or args.model or '--model'}: {tokens[0]:,} input + {tokens[1]:,} "
             f"output tokens = ${dollars(model, *tokens):,.4f}"
             for model, tokens in totals.by_model.items()]
    for model, (input_tokens, output_tokens) in totals.recaptions.items():
        lines.append(f"  re-captions by {model}: counted for every record (the worst case: each "
                     "record scored below the threshold, asked again and judged again); each "
                     f"10% of records re-captioned costs "
                     f"${dollars(model, input_tokens, output_tokens) / 10:,.4f} there")
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

"""SkipDone: records an earlier run captioned are not paid twice (``--resume``).

Finished captions are checkpointed under ``OUTDIR/.checkpoint/`` while a job runs
(checkpoint.py), and the launcher moves earlier final shards there (cli/output_dir.py). Records
are joined to those captions on their fingerprint (core/identity.py): a match is reused, the
rest go on to be captioned, and earlier captions no record reuses are written to
``set_aside-*`` (a later ``--resume`` may still reuse them), never deleted.

Earlier files are outside input: each element is checked by ``earlier_caption`` (the one check
of that shape), and a file is read as far as it can be (``earlier_captions``). A damaged one
(corrupt gzip, truncated or foreign Parquet, elements that are not such captions) costs only
what could not be read: those records are captioned again, the file is named in one warning
and copied to ``OUTDIR/damaged/``, which nothing deletes. So no earlier file can make
``--resume`` fail, now or on a later try.

With ``keep_images`` (``--copy_images``) a reused or set-aside caption carries its images'
bytes (records.IMAGE_BYTES): the image members of the earlier WebDataset shard it was read
from, else the bytes its record carries (a WebDataset sample, a table row with image bytes).
A reused caption with neither (a manifest record's, from a checkpoint part) has its record's
image paths read again (``read_missing_images``); a set-aside one is written without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_caption.core.caption_shards import caption_samples
from beam_caption.core.client import ClientSettings, token_count
from beam_caption.core.engine import WorkerConfig, read_record_images
from beam_caption.core.errors import CaptionError
from beam_caption.core.figures import figures_for
from beam_caption.core.http_images import UrlGuard
from beam_caption.core.identity import keyed_by_fingerprint
from beam_caption.core.manifest_reader import JSON_DECODER, value_problem
from beam_caption.core.outputs import (
    DAMAGE_ERRORS,
    DAMAGED_DIR,
    MAX_LINE_BYTES,
    damage_reason,
    element_texts,
)
from beam_caption.core.records import IMAGE_BYTES, carried_images
from beam_caption.core.request import image_paths
from beam_caption.transforms.checkpoint import (
    checkpoint_files,
)
from beam_caption.transforms.write import output_path

SET_ASIDE = "set_aside"
MAX_COUNT = 10**12  # attempts or tokens an earlier caption may claim (summary.json adds them)

_LOG = logging.getLogger(__name__)


def earlier_caption(text: str | None) -> tuple[str | None, dict]:
    """(fingerprint, caption) of one element of an earlier caption file (``element_texts``),
    in the shape resume reuses; raises ValueError saying what is wrong.

    The shape: strict JSON that can travel through the pipeline (manifest's limits), an object
    whose ``caption_meta`` holds a string ``key``, a string ``fingerprint`` (missing or null:
    made before fingerprints, set aside) and the figures summary.json adds up: ``attempts``,
    ``prompt_tokens`` and ``completion_tokens`` (counts, the tokens may be null), and each of
    ``prompts``' ``attempts``.
    """
    if text is None:
        raise ValueError("not UTF-8 text, or a line too long to read")
    try:
        caption = JSON_DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    problem = value_problem(caption)
    if problem:
        raise ValueError(problem[1])
    if not isinstance(caption, dict):
        raise ValueError(f"{_kind(caption)}, not an object")
    meta = caption.get("caption_meta")
    if not isinstance(meta, dict):
        raise ValueError(f"caption_meta is {_kind(meta)}, not an object")
    fingerprint = meta.get("fingerprint")
    for name, value in (("key", meta.get("key")),
                        ("fingerprint", "" if fingerprint is None else fingerprint)):
        if not isinstance(value, str):
            raise ValueError(f"caption_meta.{name} is {_kind(value)}, not a string")
    _check_count(meta, "attempts", "caption_meta", nullable=False)
    for name in ("prompt_tokens", "completion_tokens", "reasoning_tokens"):
        if name in meta or name != "reasoning_tokens":  # reasoning_tokens may be missing
            _check_count(meta, name, "caption_meta", nullable=True)
    prompts = meta.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, dict) or not all(map(_is_object, prompts.values())):
            raise ValueError("caption_meta.prompts is not an object of objects")
        for name, figures in prompts.items():
            _check_count(figures, "attempts", f"caption_meta.prompts.{name}", nullable=False)
    return fingerprint, caption


def reused_cost(caption: dict, client: ClientSettings) -> float:
    """What an earlier caption reused by resume cost when it was made, at this run's prices
    (nothing for an answer from the cache; a Batch API answer at the discount): the budget
    (``max_cost``) is the job's, across resumes."""
    meta = caption.get("caption_meta")
    if not isinstance(meta, dict) or meta.get("cached"):
        return 0.0
    return client.cost(token_count(meta.get("prompt_tokens")) or 0,
                       token_count(meta.get("completion_tokens")) or 0, bool(meta.get("batch_id")),
                       token_count(meta.get("cached_tokens")) or 0)


def _check_count(holder: dict, name: str, where: str, nullable: bool) -> None:
    value = holder.get(name)
    if value is None and nullable and name in holder:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{where}.{name} is {_kind(value) if name in holder else 'missing'}, "
                         f"not a count from 0 to {MAX_COUNT:,}")


def _is_object(value: object) -> bool:
    return isinstance(value, dict)


def _kind(value: object) -> str:
    """What a JSON value is, in words (``a list``, ``-3``), short."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)[:30]
    return ("an object" if isinstance(value, dict) else "a list" if isinstance(value, list)
            else "a string")


def earlier_captions(path: str, output_dir: str,
                     with_images: bool = False) -> Iterator[tuple[str | None, dict]]:
    """(fingerprint, caption) of each caption of the earlier file ``path`` (a checkpoint part
    or a final shard in any format), read as far as it can be; ``with_images``: a caption of
    a WebDataset shard carries the sample's image members (records.IMAGE_BYTES).

    A file with damage or with elements that are not such captions (``earlier_caption``) is
    copied to ``OUTDIR/damaged/`` and named in one warning; the records of what could not be
    read are captioned again, as no caption is found for them. A file that cannot be opened
    fails the step (the runner retries it; nothing is paid twice for a passing fault).
    """
    read, skipped, first_skipped, damage = 0, 0, "", ""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        try:
            for number, (text, images) in enumerate(_elements(handle, path, with_images), 1):
                try:
                    fingerprint, caption = earlier_caption(text)
                except ValueError as exc:
                    skipped += 1
                    first_skipped = first_skipped or f"element {number}: {str(exc)[:200]}"
                    continue
                read += 1
                if images:
                    caption[IMAGE_BYTES] = images
                yield fingerprint, caption
        except DAMAGE_ERRORS as exc:
            damage = f"unreadable after element {read + skipped:,}: {damage_reason(exc)}"
    if not (skipped or damage):
        return
    skips = (f"{skipped:,} elements are not captions it can reuse (the first, {first_skipped})"
             if skipped else "")
    _LOG.warning("resume: %s is damaged: %s. %s captions were read from it; the records of the "
                 "rest are captioned again; a copy is kept as %s", path,
                 "; ".join(filter(None, [damage, skips])), f"{read:,}",
                 _keep_damaged(path, output_dir))


def _elements(handle, path: str, with_images: bool
              ) -> Iterator[tuple[str | None, list[bytes] | None]]:
    """(JSON text, image bytes or None) of each element of an earlier file."""
    if with_images and path.endswith(".tar"):
        return caption_samples(handle, True, MAX_LINE_BYTES)
    return ((text, None) for text in element_texts(handle, path))


def _keep_damaged(path: str, output_dir: str) -> str:
    """Copy ``path`` to ``OUTDIR/damaged/`` (never deleted); returns the copy's path."""
    folder = output_path(output_dir, DAMAGED_DIR)
    if not FileSystems.exists(folder):
        with contextlib.suppress(OSError):  # another worker made it first; copy says if not
            FileSystems.mkdirs(folder)
    kept = f"{folder}/{path.rsplit('/', 1)[-1]}"
    FileSystems.copy([path], [kept])
    return kept


def _split(grouped, todo_tag: str, set_aside_tag: str, keep_images: bool = False):
    """Each record gets an earlier caption of the same fingerprint (its own key's first) or goes
    to ``todo``; earlier captions left over go to ``set_aside``, one per earlier key. With
    ``keep_images``, a reused caption without image bytes takes those its record carries."""
    _, groups = grouped
    done = list({caption["caption_meta"]["key"]: caption for caption in groups["done"]}.values())
    records = sorted(groups["records"], key=lambda element: element["key"])
    by_key = {caption["caption_meta"]["key"]: caption for caption in done}
    unmatched = [r for r in records if r["key"] not in by_key]
    used = {r["key"] for r in records if r["key"] in by_key}
    spare = [caption for key, caption in by_key.items() if key not in used]
    for record in records:
        if record["key"] in used:
            yield _with_record_images(by_key[record["key"]], record, keep_images)
    for record, caption in zip(unmatched, spare, strict=False):  # the shorter one is used up
        yield _with_record_images(
            {**caption, "caption_meta": {**caption["caption_meta"], "key": record["key"]}},
            record, keep_images)
    for record in unmatched[len(spare):]:
        yield beam.pvalue.TaggedOutput(todo_tag, record)
    for caption in spare[len(unmatched):]:
        yield beam.pvalue.TaggedOutput(set_aside_tag, caption)


def _with_record_images(caption: dict, record: dict, keep_images: bool) -> dict:
    """``caption``, with the image bytes ``record`` carries when it has none and should."""
    if not keep_images or carried_images(caption) or not record.get("images"):
        return caption
    return {**caption, IMAGE_BYTES: list(record["images"])}


def read_missing_images(caption: dict, config: WorkerConfig) -> dict:
    """A reused caption that carries no image bytes, with its record's image paths read (as
    the caption step reads them, once, no retry); as it is, logged, when they cannot be."""
    if carried_images(caption):
        return caption
    try:
        images = read_record_images(image_paths(caption, config.prompts.image_key), config,
                                    UrlGuard(config.allow_private_urls))
    except CaptionError as error:
        _LOG.warning("resume: the images of %s could not be read again for --copy_images; "
                     "its caption is written without them: %s",
                     caption["caption_meta"]["key"], error.message)
        return caption
    return {**caption, IMAGE_BYTES: images}


class _Split(beam.DoFn):
    """``_split`` in a DoFn that counts the records it finds done in the live progress."""

    def __init__(self, progress_dir: str | None, keep_images: bool):
        self._progress_dir = progress_dir
        self._keep_images = keep_images

    def setup(self):
        self._figures = figures_for(self._progress_dir)

    def process(self, grouped):
        for output in _split(grouped, "todo", SET_ASIDE, self._keep_images):
            if not isinstance(output, beam.pvalue.TaggedOutput):
                self._figures.add(resumed=1)
            yield output

    def finish_bundle(self):
        self._figures.flush()


class SkipDone(beam.PTransform):
    """Split records into those captioned by an earlier run (re-emitted once) and the rest.

    ``settings_digest`` is the digest of this run's answer settings (``record_fingerprint``).
    Returns ``{"done": PCollection[caption dict], "todo": PCollection[record element],
    "set_aside": PCollection[caption dict]}``: set_aside holds the earlier captions that no
    record of this run may reuse (other content or settings, or a manifest left out).
    ``keep_images``: the done and set-aside captions carry their images' bytes where they can
    be found (see the module).
    """

    def __init__(self, output_dir: str, settings_digest: str, progress_dir: str | None = None,
                 keep_images: bool = False):
        super().__init__()
        self._output_dir = output_dir
        self._settings_digest = settings_digest
        self._progress_dir = progress_dir
        self._keep_images = keep_images

    def expand(self, records):
        digest = self._settings_digest
        done = _read_done(records.pipeline, self._output_dir, self._keep_images)
        keyed = records | "KeyRecords" >> beam.Map(keyed_by_fingerprint, digest)
        split = ({"records": keyed, "done": done}
                 | "Join" >> beam.CoGroupByKey()
                 | "Split" >> beam.ParDo(_Split(self._progress_dir, self._keep_images))
                 .with_outputs("todo", SET_ASIDE, main="done"))
        return {"done": split.done, "todo": split.todo, "set_aside": split.set_aside}


def _read_done(pipeline: beam.Pipeline, output_dir: str,
               keep_images: bool) -> beam.PCollection:
    """(fingerprint, caption) of the checkpointed captions: checkpoint parts and earlier final
    files in any output format (listed when the graph is built, at launch; read a file per
    worker call, as far as each can be), with their images' bytes when ``keep_images``."""
    files = checkpoint_files(output_dir)
    if not files:
        return pipeline | "NothingDone" >> beam.Create([])
    return (pipeline
            | "EarlierFiles" >> beam.Create(files)
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadDone" >> beam.FlatMap(earlier_captions, output_dir, keep_images))

"""Caption again the records an earlier run's judge scored low: its captions as the new input.

Reads ``--from_output``'s captions (any output format), keeps those whose judge score
(``caption_meta.quality.score``, 1 to 10, from a prompts file's ``judge:`` prompt) is below
``--below``, writes their records as ``--output/low_score_records.jsonl`` and captions that
manifest into ``--output`` as a normal job would, with this run's flags (typically a stronger
``--model``, or a prompts file that judges again). Each record is the earlier run's input
record: its answers (summary.json's ``output_keys``) and ``caption_meta`` are left out, and
the judged answer and its score are kept as ``previous_caption`` and ``previous_score`` (a
prompt may use them: ``{previous_caption}``). Captions without a judge score are left. Run
from the repository root:

    python pipelines/recaption_low_scores.py --from_output out/ --below 5 --output out_low/ \\
        --api_url http://127.0.0.1:8011/v1 --model strong-vlm

Give the first run's --image_root (relative image paths are resolved against it).
"""

import json
import sys

import fsspec

from beam_caption.cli.recipe import Recipe, input_from_earlier_output
from beam_caption.core.errors import UsageError
from beam_caption.core.outputs import CAPTIONS_PREFIX, read_output_records
from beam_caption.core.prompts import SCORE_RANGE

LOW_SCORE_MANIFEST = "low_score_records.jsonl"


def add_flags(parser):
    parser.add_argument("--from_output", help="Output directory of the earlier run (required).")
    parser.add_argument("--below", type=float, default=None,
                        help=f"Caption again the records scored below this ({SCORE_RANGE[0]:g} "
                             f"to {SCORE_RANGE[1]:g}; required).")


def answer_keys(from_output: str) -> list[str]:
    """The fields the earlier run wrote its answers to (its summary.json's ``output_keys``;
    none when it has no summary)."""
    try:
        with fsspec.open(f"{from_output.rstrip('/')}/summary.json", "rt") as handle:
            keys = json.load(handle).get("output_keys")
    except (OSError, ValueError):
        return []
    return [key for key in keys if isinstance(key, str)] if isinstance(keys, list) else []


def write_low_score_manifest(from_output: str, output_dir: str,
                             below: float) -> tuple[str, int, int]:
    """The manifest of the records to caption again, how many it holds, and how many captions
    were left (scored at least ``below``, or not scored)."""
    path = f"{output_dir.rstrip('/')}/{LOW_SCORE_MANIFEST}"
    dropped = {*answer_keys(from_output), "caption_meta"}
    kept = left = 0
    with fsspec.open(path, "wt", encoding="utf-8", auto_mkdir=True) as manifest:
        for caption in read_output_records(from_output, CAPTIONS_PREFIX):
            meta = caption.get("caption_meta")
            quality = meta.get("quality") if isinstance(meta, dict) else None
            score = quality.get("score") if isinstance(quality, dict) else None
            if isinstance(score, bool) or not isinstance(score, (int, float)) or score >= below:
                left += 1
                continue
            record = {name: value for name, value in caption.items() if name not in dropped}
            judged = quality.get("of")  # quality is a dict: it gave the score
            record.update(previous_caption=caption.get(judged) if isinstance(judged, str)
                          else None, previous_score=score)
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
            kept += 1
    return path, kept, left


def adopt(recipe_flags, options):
    if not recipe_flags.from_output or recipe_flags.below is None:
        raise UsageError("missing required flag(s): --from_output and --below")
    if not SCORE_RANGE[0] <= recipe_flags.below <= SCORE_RANGE[1]:
        raise UsageError(f"--below must be a score from {SCORE_RANGE[0]:g} to "
                         f"{SCORE_RANGE[1]:g}, got {recipe_flags.below:g}")
    input_from_earlier_output(options, recipe_flags.from_output, LOW_SCORE_MANIFEST, "captions")


def prepare(recipe_flags, options):
    _, kept, left = write_low_score_manifest(recipe_flags.from_output, options.output,
                                             recipe_flags.below)
    print(f"captioning again {kept} records scored below {recipe_flags.below:g} in "
          f"{recipe_flags.from_output}; {left} captions left as they are")


main = Recipe("recaption_low_scores.py", __doc__.split("\n\n")[0], add_flags=add_flags,
              adopt=adopt, prepare=prepare).main

if __name__ == "__main__":
    sys.exit(main())

"""Caption rows your own pipeline produced, without any manifest: here the rows of a Parquet table.

Each row becomes a record of the manifest shape (the row's columns, with its image path or URL
from ``--image_column`` under ``image``), ``records | bc.CaptionRecords(config)`` captions them
and ``bc.WriteCaptions`` writes the outputs the CLI writes (``captions-*``, ``failures-*``,
``summary.json``); ``launch.caption_records`` and ``launch.write_captions`` make those two with
the flags' checkpoints, ``--resume`` and output settings. Replace ``ReadRows`` with any source
(BigQuery, a DoFn of yours): the lines after it stay. Run from the repository root, e.g.
against the bundled fake server:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/caption_rows.py --input 'photos/*.parquet' --image_column path \\
        --output out/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm

(``photos/*.parquet`` is a placeholder for your table.) It takes every flag of
``python -m beam_caption --help``; ``--resume`` reuses the captions of an earlier run for the
rows of the same content. It shows no live progress (that counts manifest records).
"""

import json
import sys

import apache_beam as beam

from beam_caption.cli.recipe import Recipe


def add_flags(parser):
    parser.add_argument("--image_column", default="image",
                        help="Column holding each row's image path or URL (default image).")
    parser.add_argument("--key_column", default=None,
                        help="Column whose value keys each row in caption_meta.key and "
                             "failures (default: the row's content).")


def as_record(row: dict, image_column: str, image_key: str) -> dict:
    """A table row as a manifest record: its columns as JSON values, its image under
    ``image_key``."""
    record = json.loads(json.dumps(row, default=str))  # dates, bytes... as text
    record[image_key] = record.pop(image_column, None)  # none: the record fails, named
    return record


def build(pipeline, launch, recipe_flags):
    config = launch.config  # the flags' bc.CaptionConfig
    records = (pipeline
               | "Tables" >> beam.Create(launch.files)
               | "ReadRows" >> beam.io.ReadAllFromParquet()
               | "AsRecords" >> beam.Map(as_record, recipe_flags.image_column, config.image_key))
    results = records | "Caption" >> launch.caption_records(key_field=recipe_flags.key_column)
    _ = results | "Write" >> launch.write_captions()


main = Recipe("caption_rows.py", __doc__.split("\n\n")[0], build=build, add_flags=add_flags,
              manifests=False).main

if __name__ == "__main__":
    sys.exit(main())

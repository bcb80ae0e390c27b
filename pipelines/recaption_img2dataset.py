"""Caption an img2dataset output folder again and write the captioned set as WebDataset shards.

img2dataset writes ``FOLDER/00000.tar``, ``00001.tar``... (each sample ``KEY.jpg``,
``KEY.json`` with its url, key and status, ``KEY.txt`` with the alt text it was downloaded
with) beside per-shard ``.parquet`` and ``_stats.json`` files. This recipe reads the shards
(streamed, never extracted), captions each sample and writes ``captions-*.tar`` shards holding
``KEY.json`` (the sample's record with its ``caption``), ``KEY.txt`` (the new caption) and the
image (``--no_copy_images`` leaves it out), so a training data loader reads the captioned set
directly; ``failures-*.jsonl`` names the samples that could not be captioned. With
``--alt_text_hint`` each prompt shows the model the sample's alt text as a hint, as
Recap-DataComp did. Run from the repository root, e.g. against the bundled fake server:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/recaption_img2dataset.py --img2dataset_folder laion_part/ \\
        --output recaptioned/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm

(``laion_part/`` is a placeholder for your folder.) It takes every flag of
``python -m beam_caption --help``; ``--resume`` reuses the captions (and images) an earlier
run wrote for the samples of the same content.
"""

import dataclasses
import sys

import apache_beam as beam

from beam_caption.cli.recipe import Recipe, same_flag
from beam_caption.core.errors import UsageError
from beam_caption.core.inputs import SAMPLE_PROMPT

SHARDS = "*.tar"  # img2dataset's output_format webdataset
ALT_TEXT_HINT = ("\n\nThe image was published with this alt text, which may be wrong or "
                 "incomplete: {alt_text}")


def add_flags(parser):
    parser.add_argument("--img2dataset_folder",
                        help="img2dataset's output folder: its *.tar shards are read "
                             "(required unless --input names the shards).")
    parser.add_argument("--no_copy_images", action="store_true", default=False,
                        help="Leave the images out of the output shards (KEY.json and KEY.txt "
                             "only).")
    parser.add_argument("--alt_text_hint", action="store_true", default=False,
                        help="Show the model each sample's alt text (its .txt) in the prompt.")


def adopt(recipe_flags, options):
    folder = recipe_flags.img2dataset_folder
    shards = None if folder is None else [f"{folder.rstrip('/')}/{SHARDS}"]
    options.input = same_flag("--img2dataset_folder", shards, "--input", options.input or None)
    if not options.input:
        raise UsageError("missing required flag: --img2dataset_folder")
    if options.output_format == "jsonl":  # the default: this recipe writes shards
        options.output_format = "webdataset"
    options.copy_images = options.output_format == "webdataset" and not recipe_flags.no_copy_images
    if recipe_flags.alt_text_hint and options.prompts_file:
        raise UsageError("--alt_text_hint adds to the one prompt: leave out --prompts_file")


def with_alt_text(element: dict, prompt: str) -> dict:
    """A sample's element whose record asks ``prompt`` with the sample's alt text as a hint
    (as its conversation); a sample without alt text is asked ``prompt`` alone."""
    record = element.get("record")
    if not isinstance(record, dict):
        return element  # a read failure passes through as it is
    alt_text = record.get("txt")
    text = prompt if not isinstance(alt_text, str) or not alt_text.strip() \
        else prompt + ALT_TEXT_HINT.format(alt_text=alt_text.strip()[:1000])
    hinted = {**record, "conversation": [{"from": "human", "value": text}]}
    return {**element, "record": hinted}


def build(pipeline, launch, recipe_flags):
    config = launch.config
    samples = pipeline | "Read" >> launch.read_manifests()
    if recipe_flags.alt_text_hint:
        # the record's conversation is asked: --prompt would replace it
        config = dataclasses.replace(config, prompt=None)
        samples = samples._replace(records=samples.records | "AltTextHint" >> beam.Map(
            with_alt_text, launch.config.prompt or SAMPLE_PROMPT))
    results = samples | "Caption" >> launch.caption_records(config)
    _ = results | "Write" >> launch.write_captions(config)


main = Recipe("recaption_img2dataset.py", __doc__.split("\n\n")[0], build=build,
              add_flags=add_flags, adopt=adopt).main

if __name__ == "__main__":
    sys.exit(main())

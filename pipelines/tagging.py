"""Tag images with structured output, then count the tags across the collection.

The model answers a JSON schema (``TAGS_SCHEMA``: objects seen, the scene, whether there is
text); each answer is parsed and checked against the schema before it is kept (a
non-conforming one is asked again, then recorded as a ``response/schema`` failure), so the
``tags`` field of every output record is a JSON object, not a string. A second step reads
those objects in the same pipeline and writes ``OUTDIR/tag_counts.json``: each object tag and
scene with the number of images that have it. Run from the repository root, e.g.:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/tagging.py --input data/image_caption/sample_data.json \\
        --output out/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm
"""

import dataclasses
import json
import sys

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

import beam_caption as bc
from beam_caption.cli.recipe import Recipe

TAGS_SCHEMA = {
    "type": "object",
    "properties": {
        "objects": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "scene": {"enum": ["indoor", "outdoor", "studio", "unknown"]},
        "has_text": {"type": "boolean"},
    },
    "required": ["objects", "scene", "has_text"],
    "additionalProperties": False,
}
PROMPTS = bc.parse_prompts({"tags": {
    "system": "You tag images for a search index. Answer with JSON only.",
    "prompt": "List the main objects (lowercase nouns), the scene and whether the image "
              "shows text.",
    "schema": TAGS_SCHEMA, "temperature": 0}})


def tag_names(caption: dict) -> list[str]:
    """The tags of one captioned record: its objects, and its scene."""
    tags = caption["tags"]
    return sorted({*(f"object:{name.lower()}" for name in tags["objects"]),
                   f"scene:{tags['scene']}"})


def write_counts(counts: list[tuple[str, int]], output_dir: str) -> None:
    path = f"{output_dir.rstrip('/')}/tag_counts.json"
    with FileSystems.create(path) as handle:
        ordered = dict(sorted(counts, key=lambda item: (-item[1], item[0])))
        handle.write(json.dumps(ordered, indent=2).encode("utf-8"))


def build(pipeline, launch, recipe_flags):
    config = dataclasses.replace(launch.config, prompts=PROMPTS)
    # bc.ReadManifests, bc.CaptionRecords and bc.WriteCaptions, with the launch's flags
    records = pipeline | "ReadManifests" >> launch.read_manifests()
    results = records | "Caption" >> launch.caption_records(config)
    _ = results | "Write" >> launch.write_captions(config)
    _ = (results.captions
         | "Tags" >> beam.FlatMap(tag_names)
         | "Count" >> beam.combiners.Count.PerElement()
         | "Gather" >> beam.combiners.ToList()
         | "WriteCounts" >> beam.Map(write_counts, launch.options.output))


main = Recipe("tagging.py", __doc__.split("\n\n")[0], build=build).main

if __name__ == "__main__":
    sys.exit(main())

"""Caption images with an OpenAI-compatible VLM: the recipe to copy.

It runs the same composite transform as ``python -m beam_caption`` (CaptionManifests: read ->
[skip done] -> caption -> write). Run from the repository root, e.g. against the bundled fake
server:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/image_caption.py --images_file data/image_caption/sample_data.json \\
        --output out/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm

``--images_file`` and ``--cache_path`` are the flag names of the pipeline this project replaces
(``--input`` and ``--output`` work too); every flag of ``python -m beam_caption --help`` works.
"""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.cli.config import manifests_job
from beam_caption.cli.flags import CaptionOptions, prepare_launch, split_inputs
from beam_caption.core.manifest_reader import match_manifests


class RecipeOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--images_file", help="JSON or JSONL manifest (same as --input).")
        parser.add_argument("--cache_path", help="Output directory (same as --output).")


def main(argv=None):
    options = PipelineOptions(argv)
    recipe, flags = options.view_as(RecipeOptions), options.view_as(CaptionOptions)
    flags.output = flags.output or recipe.cache_path
    prepare_launch(options)
    files = match_manifests(split_inputs(flags.input) or [recipe.images_file])
    with beam.Pipeline(options=options) as p:
        p | "CaptionManifests" >> manifests_job(flags, files)


if __name__ == "__main__":
    main()

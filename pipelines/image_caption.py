"""Caption images with an OpenAI-compatible VLM: read -> caption -> write.

The recipe to copy. Run from the repository root, e.g. against the bundled fake server:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/image_caption.py --images_file data/image_caption/sample_data.json \\
        --output out/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm

Every flag of ``python -m beam_caption --help`` works here too (they are CaptionOptions).
"""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.caption import CaptionImages
from beam_caption.manifest import ReadManifests, match_manifests
from beam_caption.options import CaptionOptions
from beam_caption.pipeline import caption_config
from beam_caption.sinks import CAPTIONS_PREFIX, FAILURES_PREFIX, WriteJsonLines


class RecipeOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--images_file", required=True,
                            help="JSON or JSONL manifest of {image, conversation} records.")


def main(argv=None):
    options = PipelineOptions(argv)
    images_file = options.view_as(RecipeOptions).images_file
    flags = options.view_as(CaptionOptions)
    with beam.Pipeline(options=options) as p:
        records = p | "Read" >> ReadManifests(match_manifests([images_file]))
        captioned = records["records"] | "Caption" >> CaptionImages(caption_config(flags))
        captioned["captions"] | "WriteCaptions" >> WriteJsonLines(flags.output, CAPTIONS_PREFIX)
        ((records["failures"], captioned["failures"])
         | "AllFailures" >> beam.Flatten()
         | "WriteFailures" >> WriteJsonLines(flags.output, FAILURES_PREFIX))


if __name__ == "__main__":
    main()

"""Ask every image several questions in one pass: a caption, alt text and a yes/no question.

Each image is read and prepared once and asked each prompt; each answer lands under its own
key of the same output record (``caption``, ``alt_text``, ``has_people``); a prompt that fails
fails the record naming that prompt, keeping the other answers. The prompts are set in code
here (``PROMPTS``); ``--prompts_file`` replaces them. Run from the repository root, e.g.
against the bundled fake server:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/several_prompts.py --input data/image_caption/sample_data.json \\
        --output out/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm

Every flag of ``python -m beam_caption --help`` works.
"""

import dataclasses

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_caption.cli.config import caption_config
from beam_caption.cli.flags import CaptionOptions, prepare_launch, split_inputs
from beam_caption.core.manifest_reader import match_manifests
from beam_caption.core.prompts import parse_prompts
from beam_caption.transforms.job import CaptionManifests

PROMPTS = parse_prompts({
    "caption": {"prompt": "Describe the image in one detailed paragraph."},
    "alt_text": {"prompt": "Write alt text of at most 125 characters for this image.",
                 "max_tokens": 60},
    "has_people": {"prompt": "Are there people in this image? Answer yes or no.",
                   "max_tokens": 3, "temperature": 0},
})


def main(argv=None):
    options = PipelineOptions(argv)
    flags = options.view_as(CaptionOptions)
    prepare_launch(options)
    config = caption_config(flags)  # the flags' settings; --prompts_file's prompts if given
    if not flags.prompts_file:
        config = dataclasses.replace(
            config, prompts=dataclasses.replace(config.prompts, specs=PROMPTS))
    files = match_manifests(split_inputs(flags.input))
    with beam.Pipeline(options=options) as p:
        p | "CaptionManifests" >> CaptionManifests(
            files, config, flags.output, image_key=flags.image_key,
            output_format=flags.output_format, compression=flags.output_compression)


if __name__ == "__main__":
    main()

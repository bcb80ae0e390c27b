"""Ask every image several questions in one pass: a caption, alt text and a yes/no question.

Each image is read and prepared once and asked each prompt; each answer lands under its own
key of the same output record (``caption``, ``alt_text``, ``has_people``); a prompt that fails
fails the record naming that prompt, keeping the other answers. The prompts are set in code
here (``PROMPTS``); ``--prompts_file`` replaces them. Run from the repository root, e.g.
against the bundled fake server:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/several_prompts.py --input data/image_caption/sample_data.json \\
        --output out/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm

Every flag of ``python -m beam_caption --help`` works, with the CLI's launch (see
``beam_caption/cli/recipe.py``).
"""

import dataclasses
import sys

import beam_caption as bc
from beam_caption.cli.recipe import Recipe

PROMPTS = bc.parse_prompts({
    "caption": {"prompt": "Describe the image in one detailed paragraph."},
    "alt_text": {"prompt": "Write alt text of at most 125 characters for this image.",
                 "max_tokens": 60},
    "has_people": {"prompt": "Are there people in this image? Answer yes or no.",
                   "max_tokens": 3, "temperature": 0},
})


def build(pipeline, launch, recipe_flags):
    config = launch.config  # a bc.CaptionConfig of the flags; --prompts_file's prompts if given
    if not config.prompts_file:
        config = dataclasses.replace(config, prompts=PROMPTS)
    # bc.ReadManifests, bc.CaptionRecords and bc.WriteCaptions, with the launch's flags
    # (checkpoints and --resume in --output, live progress, output format...)
    records = pipeline | "ReadManifests" >> launch.read_manifests()
    results = records | "Caption" >> launch.caption_records(config)
    _ = results | "Write" >> launch.write_captions(config)


main = Recipe("several_prompts.py", __doc__.split("\n\n")[0], build=build).main

if __name__ == "__main__":
    sys.exit(main())

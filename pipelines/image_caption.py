"""Caption images with an OpenAI-compatible VLM: the recipe to copy.

It runs the CLI's job (``bc.ReadManifests -> bc.CaptionRecords -> bc.WriteCaptions``, with
checkpoints and --resume in the output directory) with the CLI's launch: its flags checked,
the endpoint preflighted, the output directory's rules (--resume, --overwrite), the summary
line and exit status. Run from the repository root, e.g. against the bundled fake
server:

    python -m beam_caption.testing.fake_vlm --port 8011 &
    python pipelines/image_caption.py --images_file data/image_caption/sample_data.json \\
        --cache_path out/ --api_url http://127.0.0.1:8011/v1 --model fake-vlm

It takes the flags of the pipeline this project replaces beside every flag of
``python -m beam_caption --help``: ``--images_file`` (``--input``), ``--cache_path``
(``--output``), ``--file_name_prefix`` (the caption files' name instead of ``captions``) and
``--cache_type json|jsonl`` (``--output_format``).
"""

import sys

from beam_caption.cli.recipe import Recipe, same_flag


def add_flags(parser):
    parser.add_argument("--images_file", action="append",
                        help="JSON or JSONL manifest (same as --input).")
    parser.add_argument("--cache_path", help="Output directory (same as --output).")
    parser.add_argument("--file_name_prefix", default="captions",
                        help="Name of the caption files: PREFIX-00000-of-00001.jsonl "
                             "(default captions).")
    parser.add_argument("--cache_type", choices=("json", "jsonl"),
                        help="Output format (same as --output_format json|jsonl).")


def adopt(recipe_flags, options):
    options.input = same_flag("--images_file", recipe_flags.images_file, "--input", options.input)
    options.output = same_flag("--cache_path", recipe_flags.cache_path, "--output", options.output)
    default_format = None if options.output_format == "jsonl" else options.output_format
    options.output_format = same_flag("--cache_type", recipe_flags.cache_type, "--output_format",
                                      default_format) or "jsonl"


RECIPE = Recipe("image_caption.py", __doc__.split("\n\n")[0], add_flags=add_flags, adopt=adopt)
main = RECIPE.main

if __name__ == "__main__":
    sys.exit(main())

"""beam_caption: caption large image collections with OpenAI-compatible VLMs on Apache Beam.

The public API, for a Beam pipeline of your own (docs/library.md)::

    import apache_beam as beam
    import beam_caption as bc

    config = bc.CaptionConfig(api_url="http://localhost:8000/v1", model="my-vlm")
    with beam.Pipeline() as p:
        results = p | bc.ReadManifests(["data/*.jsonl"]) | bc.CaptionRecords(config)
        results | bc.WriteCaptions("out/", config)

Names are imported when first used, so ``import beam_caption.core`` (the layer without Beam)
does not import Beam.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["DEFAULT_SYSTEM_PROMPT", "CaptionConfig", "CaptionModelHandler", "CaptionRecords",
           "CaptionResults", "ManifestRecords", "ReadManifests", "WriteCaptions",
           "parse_prompts"]

# Each public name -> the module that defines it.
_HOMES = {
    "DEFAULT_SYSTEM_PROMPT": "beam_caption.core.request",
    "CaptionConfig": "beam_caption.core.settings",
    "parse_prompts": "beam_caption.core.prompts",
    "CaptionRecords": "beam_caption.transforms.library",
    "CaptionResults": "beam_caption.transforms.library",
    "ManifestRecords": "beam_caption.transforms.library",
    "ReadManifests": "beam_caption.transforms.library",
    "WriteCaptions": "beam_caption.transforms.library",
    "CaptionModelHandler": "beam_caption.transforms.handler",
}

if TYPE_CHECKING:
    from beam_caption.core.prompts import parse_prompts
    from beam_caption.core.request import DEFAULT_SYSTEM_PROMPT
    from beam_caption.core.settings import CaptionConfig
    from beam_caption.transforms.handler import CaptionModelHandler
    from beam_caption.transforms.library import (
        CaptionRecords,
        CaptionResults,
        ManifestRecords,
        ReadManifests,
        WriteCaptions,
    )


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

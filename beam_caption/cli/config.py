"""From flags to configuration: the public ``CaptionConfig`` (``flags_config``) and the workers'
(``caption_config``) for parsed CaptionOptions. The launcher builds the job from these
(cli/launcher.Launch); the transforms and core below know no flags."""

from __future__ import annotations

from beam_caption.cli.flags import CaptionOptions
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.settings import CaptionConfig


def flags_config(options: CaptionOptions) -> CaptionConfig:
    """The public configuration from the parsed flags: CaptionConfig's fields, by name
    (core/settings.py)."""
    return CaptionConfig(**{name: getattr(options, name) for name in CaptionConfig.flag_names()})


def caption_config(options: CaptionOptions) -> WorkerConfig:
    """The worker-side configuration from the parsed flags (``flags_config``'s)."""
    return flags_config(options).worker_config()

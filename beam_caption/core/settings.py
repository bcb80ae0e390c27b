"""CaptionConfig: the public, flat configuration of captioning, with the CLI's defaults.

Every field but ``prompts`` is a request-related flag of ``python -m beam_caption`` of the
same name, whose default is the field's (the flag table, cli/flag_table.py, takes it from here),
so the CLI derives its configuration from its flags (cli/config.caption_config) and a library
user writes the same names as keywords. ``check_settings`` refuses settings that contradict
each other, for a CaptionConfig and for the CLI's flags alike (the CLI names them as flags).
``worker_config`` turns it into the engine's ``WorkerConfig`` (core/engine.py): nested as the
engine's parts use it, with what is decided at launch (defaults that depend on other fields,
the prompts file read, where workers find the API key) resolved. No Beam here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from beam_caption.core.answer_checks import DEFAULT_CHECKS, AnswerChecks, parse_checks
from beam_caption.core.api_keys import SECRET_VERSION, KeySource
from beam_caption.core.errors import UsageError
from beam_caption.core.limits import MAX_IMAGE_BYTES
from beam_caption.core.prompts import load_prompts_file
from beam_caption.core.redact import redact_url
from beam_caption.core.request import DEFAULT_SYSTEM_PROMPT, PromptSettings
from beam_caption.core.stages import model_prices
from beam_caption.core.tokens import default_max_side

if TYPE_CHECKING:
    from beam_caption.core.engine import WorkerConfig
    from beam_caption.core.prompts import PromptSpec

NOT_A_FLAG = "library only"  # the metadata of the fields that are no CLI flag
DEFAULT_OUTPUT_KEY = "caption"
_LOCATIONS = ("api_url", "image_root", "cache_dir", "api_key_file", "prompts_file",
              "refusal_phrases_file")
_PROMPT_SOURCES = ("prompt", "prompts_file", "prompts")


def check_settings(settings: Any, name: Callable[[str], str] = str) -> None:
    """Raise UsageError for captioning settings that contradict each other or cannot be used:
    two sources of the prompt, an ``output_key`` beside several prompts, two sources of the key,
    a secret that is no version name, ``max_cost`` without prices, an ``answer_checks`` that
    names no check.

    Args:
        settings: a CaptionConfig, or anything with its fields as attributes (the CLI's
            parsed flags; ``prompts``, the library's own, may be missing).
        name: how a message names a setting (the CLI: ``--`` and the name, as its flags).
    """
    if settings.max_cost and not (settings.price_per_million_input_tokens or
                                  settings.price_per_million_output_tokens):
        raise UsageError(f"{name('max_cost')} needs the model's prices: "
                         f"{name('price_per_million_input_tokens')} and "
                         f"{name('price_per_million_output_tokens')}")
    asked = [source for source in _PROMPT_SOURCES if getattr(settings, source, None)]
    if len(asked) > 1:
        raise UsageError(f"give the prompt with {' or '.join(map(name, asked))}, "
                         f"{'not both' if len(asked) == 2 else 'only one'}")
    several = [source for source in asked if source != "prompt"]
    if several and settings.output_key != DEFAULT_OUTPUT_KEY:
        raise UsageError(f"with {name(several[0])} each prompt names its output_key; leave out "
                         f"{name('output_key')}")
    if settings.api_key_file and settings.api_key_secret:
        raise UsageError(f"give the key with one of {name('api_key_file')} and "
                         f"{name('api_key_secret')}")
    parse_checks(settings.answer_checks, name("answer_checks"))
    if settings.api_key_secret and not SECRET_VERSION.fullmatch(settings.api_key_secret):
        raise UsageError(f"{name('api_key_secret')} {settings.api_key_secret!r} is not a secret "
                         "version name (projects/PROJECT/secrets/NAME/versions/VERSION, e.g. "
                         "versions/latest)")


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """How records are captioned: the model, what is asked, images, limits and costs.

    Each field is the CLI flag of the same name, with the same default (``python -m
    beam_caption --help`` describes them all); ``prompts`` is the library's own. The API key is
    never a field: ``api_key_env``, ``api_key_file`` or ``api_key_secret`` say where the
    workers read it (by default the variable DF_API_KEY, then OPENAI_API_KEY).

    Example::

        config = bc.CaptionConfig(api_url="http://localhost:8000/v1",
                                  model="Qwen/Qwen2.5-VL-7B-Instruct", max_concurrency=64)

    Attributes:
        api_url: OpenAI-compatible base URL ending in /v1.
        model: Model name sent in each request.
        system_prompt: Sent first in every request ('' sends none).
        prompt: User prompt for every image; by default the record's human turns from
            ``conversation_key``.
        prompts_file: YAML or JSON file of several prompts (see ``parse_prompts``), read
            when ``worker_config`` is made.
        prompts: Several prompts given in code (``parse_prompts(...)``); not with
            ``prompt`` or ``prompts_file``.
        image_key: Record field holding the image path or list of paths.
        conversation_key: Record field holding the conversation turns.
        output_key: Field the caption is written to (with several prompts each names its own).
        image_root: Base for relative image paths (default: the current directory when
            ``worker_config`` is made).
    """

    api_url: str
    model: str
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    prompt: str | None = None
    prompts_file: str | None = None
    prompts: tuple[PromptSpec, ...] = dataclasses.field(default=(),
                                                        metadata={NOT_A_FLAG: True})
    image_key: str = "image"
    conversation_key: str = "conversation"
    output_key: str = DEFAULT_OUTPUT_KEY
    image_root: str | None = None
    # where workers read the API key (never the key)
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key_secret: str | None = None
    # what each request asks
    max_tokens: int | None = None
    temperature: float | None = None
    reasoning_effort: str | None = None
    # how requests are sent
    max_concurrency: int = 32
    request_timeout: float = 120.0
    max_retries: int = 6
    max_backoff: float = 60.0
    max_retry_wait: float = 300.0
    max_response_bytes: int = 4 * 2**20
    max_caption_chars: int = 32_000
    # what a text answer must pass to be kept (core/answer_checks.py)
    answer_checks: str = DEFAULT_CHECKS
    min_caption_chars: int = 0
    refusal_phrases_file: str | None = None
    max_bytes_in_flight: int = 256 * 2**20
    max_requests_per_minute: float | None = None
    max_tokens_per_minute: float | None = None
    worker_processes: int | None = None  # processes sharing the job-wide limits (None: 1)
    cache_dir: str | None = None
    # what it costs
    max_cost: float | None = None
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0
    price_per_million_cached_input_tokens: float | None = None  # None: the input price
    batch_discount: float = 0.5
    # images
    max_image_side: int | None = None  # None: 1024, or 512 for OpenAI's low detail
    max_image_bytes: int = MAX_IMAGE_BYTES
    jpeg_quality: int = 85
    image_timeout: float = 60.0
    image_detail: str | None = None
    token_formula: str = "openai"
    image_retries: int = 3
    allow_private_urls: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.api_url or not self.model:
            raise UsageError("CaptionConfig needs api_url and model")
        check_settings(self)

    @classmethod
    def flag_names(cls) -> list[str]:
        """The fields that are CLI flags of the same name (all but the library's own)."""
        return [field.name for field in dataclasses.fields(cls)
                if not field.metadata.get(NOT_A_FLAG)]

    @classmethod
    def flag_defaults(cls) -> dict[str, Any]:
        """The default of each flag field that has one: the CLI's flag defaults."""
        return {field.name: field.default for field in dataclasses.fields(cls)
                if not field.metadata.get(NOT_A_FLAG) and field.default is not dataclasses.MISSING}

    def worker_config(self) -> WorkerConfig:
        """The engine's configuration, made where the pipeline is built: ``image_root`` by
        default the current directory, the default image side, the prompts file read,
        ``max_cost`` shared among ``worker_processes`` and where workers find the key (required
        of them when this machine has one)."""
        # Imported here: the flag table (--help, estimate) reads this module without starting
        # the HTTP client and the image libraries.
        from beam_caption.core.client import ClientSettings
        from beam_caption.core.engine import WorkerConfig
        from beam_caption.core.images import ImageSettings

        processes = self.worker_processes or 1
        max_side = self.max_image_side
        if max_side is None:
            max_side = default_max_side(self.token_formula, self.image_detail)
        return WorkerConfig(
            client=ClientSettings(
                api_url=self.api_url, model=self.model, max_concurrency=self.max_concurrency,
                request_timeout=self.request_timeout, max_retries=self.max_retries,
                max_backoff=self.max_backoff,
                max_requests_per_minute=self.max_requests_per_minute,
                max_tokens_per_minute=self.max_tokens_per_minute, worker_processes=processes,
                max_tokens=self.max_tokens, temperature=self.temperature,
                reasoning_effort=self.reasoning_effort, max_retry_wait=self.max_retry_wait,
                max_response_bytes=self.max_response_bytes,
                max_caption_chars=self.max_caption_chars,
                max_cost=self.max_cost / processes if self.max_cost else None,
                price_per_million_input_tokens=self.price_per_million_input_tokens,
                price_per_million_output_tokens=self.price_per_million_output_tokens,
                price_per_million_cached_input_tokens=self.price_per_million_cached_input_tokens,
                batch_discount=self.batch_discount),
            prompts=PromptSettings(
                system_prompt=self.system_prompt or None, prompt=self.prompt,
                image_key=self.image_key, conversation_key=self.conversation_key,
                image_detail=self.image_detail, specs=self._specs),
            images=ImageSettings(max_side=max_side, max_bytes=self.max_image_bytes,
                                 jpeg_quality=self.jpeg_quality),
            image_root=self.image_root or os.getcwd(),
            output_key=self.output_key,
            api_key=KeySource.for_launch(self.api_key_env, self.api_key_file,
                                         self.api_key_secret),
            cache_dir=self.cache_dir,
            max_bytes_in_flight=self.max_bytes_in_flight,
            image_timeout=self.image_timeout,
            image_retries=self.image_retries,
            allow_private_urls=self.allow_private_urls,
            token_formula=self.token_formula,
            answer_checks=self._answer_checks,
        )

    # Read once per config: a launch builds the workers' config in several places.
    @functools.cached_property
    def _specs(self) -> tuple[PromptSpec, ...]:
        """The prompts: ``prompts``, or the prompts file's (read now)."""
        return load_prompts_file(self.prompts_file) if self.prompts_file else self.prompts

    @functools.cached_property
    def _answer_checks(self) -> AnswerChecks:
        """The answer checks, their refusal phrases file read now."""
        return AnswerChecks.from_settings(self.answer_checks, self.min_caption_chars,
                                          self.refusal_phrases_file)

    def reported(self) -> dict[str, Any]:
        """The settings as summary.json's ``options`` shows them: every flag field, URLs
        without credentials or queries, and the names of ``prompts`` (no secret: the API key is
        never a field)."""
        reported: dict[str, Any] = {name: getattr(self, name) for name in self.flag_names()}
        for name in _LOCATIONS:
            reported[name] = reported[name] and redact_url(reported[name])
        if self.prompts:
            reported["prompts"] = [spec.name for spec in self.prompts]
        prices = model_prices(self._specs, self.price_per_million_input_tokens,
                              self.price_per_million_output_tokens)
        if prices:  # the prompts' own models' (summary.json's cost by model)
            reported["model_prices"] = prices
        return reported

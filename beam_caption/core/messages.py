"""Chat messages from a manifest record: which images, which turns, in OpenAI format."""

from __future__ import annotations

from dataclasses import dataclass

from beam_caption.core.errors import CaptionError
from beam_caption.core.prompts import PromptSpec

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM_PROMPT = (
    "You are an image caption generator. Your task is to generate a concise and informative "
    "caption for the given image content."
)


@dataclass(frozen=True)
class PromptSettings:
    """How a record becomes a request: which fields to read and which prompts to send."""

    system_prompt: str | None
    prompt: str | None = None
    image_key: str = "image"
    conversation_key: str = "conversation"
    image_detail: str | None = None  # OpenAI's low | high | auto, sent with every image
    specs: tuple[PromptSpec, ...] = ()  # --prompts_file's prompts; () asks the one above

    def prompt_specs(self, output_key: str) -> tuple[PromptSpec, ...]:
        """The prompts each record is asked: the prompts file's, else the one of the flags."""
        return self.specs or (PromptSpec(name=output_key, output_key=output_key,
                                          prompt=self.prompt, template=False),)


@dataclass(frozen=True)
class RequestPlan:
    """What a record asks for, checked before any image is loaded.

    turns: (role, text) pairs; the images go into the first user turn.
    """

    image_paths: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]


def plan_request(record: dict, settings: PromptSettings,
                 spec: PromptSpec | None = None) -> RequestPlan:
    """Validate a record and extract its image paths and the turns ``spec`` (default: the
    flags' prompt) asks.

    Raises CaptionError(stage="read") for a record that cannot make a request.
    """
    return RequestPlan(image_paths(record, settings.image_key),
                       prompt_turns(record, settings, spec))


def prompt_turns(record: dict, settings: PromptSettings,
                 spec: PromptSpec | None = None) -> tuple[tuple[str, str], ...]:
    """The turns one prompt asks of a record: its text (fields filled in), else the record's
    conversation (or --prompt). CaptionError(read) when the record cannot give them."""
    if spec is not None and spec.prompt is not None:
        return (("user", spec.user_text(record)),)
    return _turns(record, settings)


def image_paths(record: dict, image_key: str) -> tuple[str, ...]:
    """The record's image paths; CaptionError(read) for a field that does not hold any."""
    if image_key not in record:
        raise CaptionError("read", "missing_image_key", f"record has no {image_key!r} field")
    value = record[image_key]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise CaptionError("read", "bad_image_field",
                           f"{image_key!r} must be a string or a list of strings")
    if not paths:
        raise CaptionError("read", "no_images", f"{image_key!r} is an empty list")
    if not all(p.strip() for p in paths):
        raise CaptionError("read", "empty_image_path", f"{image_key!r} holds an empty path")
    return tuple(paths)


def _turns(record: dict, settings: PromptSettings) -> tuple[tuple[str, str], ...]:
    if settings.prompt:
        return (("user", settings.prompt),)
    conversation = record.get(settings.conversation_key)
    if not isinstance(conversation, list):
        raise CaptionError("read", "no_prompt",
                           f"record has no {settings.conversation_key!r} list and no --prompt "
                           "was given")
    turns = []
    for turn in conversation:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise CaptionError("read", "bad_conversation",
                               "each conversation turn must be an object with a string 'value'")
        role = ROLES.get(str(turn.get("from")))
        if role is None:
            raise CaptionError("read", "bad_conversation",
                               f"unknown conversation role {turn.get('from')!r}")
        turns.append((role, turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()))
    # The answer is what we generate: drop the turns after the last user turn.
    last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
    if last_user is None:
        raise CaptionError("read", "no_prompt",
                           "conversation has no human turn and no --prompt was given")
    return tuple(turns[:last_user + 1])


def build_messages(plan: RequestPlan, image_urls: list[str], system_prompt: str | None,
                   image_detail: str | None = None) -> list[dict]:
    """OpenAI chat messages: system prompt, then the turns, images first in the first user turn
    (with ``detail`` when ``image_detail`` is given)."""
    detail = {"detail": image_detail} if image_detail else {}
    messages: list[dict] = []
    if system_prompt and not any(role == "system" for role, _ in plan.turns):
        messages.append({"role": "system", "content": system_prompt})
    images_sent = False
    for role, text in plan.turns:
        if role == "user" and not images_sent:
            parts: list[dict] = [{"type": "image_url", "image_url": {"url": url, **detail}}
                                 for url in image_urls]
            if text:
                parts.append({"type": "text", "text": text})
            messages.append({"role": "user", "content": parts})
            images_sent = True
        else:
            messages.append({"role": role, "content": text})
    return messages

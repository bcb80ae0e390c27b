"""What one request holds: the chat messages made from a record and the parameters sent
beside them, spelled the way the endpoint accepts them.

Messages: which images (``image_paths``), which turns (``prompt_turns``: a prompt's text, else
the record's conversation or ``--prompt``) and the OpenAI chat format (``build_messages``);
``PromptSettings`` says which record fields to read and which prompts to send (several prompts
come from the prompts file, prompts.py).

Parameters: servers disagree. OpenAI's reasoning models (gpt-5, o-series) refuse ``max_tokens``
and any ``temperature`` but the default, older OpenAI-compatible servers refuse
``max_completion_tokens``, and chat models may refuse ``reasoning_effort``. The completion
limit is sent as ``max_completion_tokens`` first (OpenAI accepts it for every model); when a
server answers 400 naming a parameter, the client switches to the other spelling once, or drops
the parameter with one warning, and keeps that choice for the rest of the run
(``AcceptedParams``).

A request body is built with the parameters first (``{"model", params..., "messages"}``), so
a changed spelling replaces a few bytes at its head instead of re-serializing the images.
"""

from __future__ import annotations

import json
import logging
import re
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
LIMIT_SPELLINGS = ("max_completion_tokens", "max_tokens")
_REFUSAL_WORDS = re.compile(
    r"unsupported|not supported|unrecognized|unknown|extra|not allowed|not permitted|invalid|"
    r"only the default", re.IGNORECASE)
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))

_LOG = logging.getLogger(__name__)


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


def prompt_turns(record: dict, settings: PromptSettings, spec: PromptSpec | None = None,
                 answers: dict | None = None) -> tuple[tuple[str, str], ...]:
    """The turns one prompt asks of a record: its text (fields and the ``answers`` of the
    prompts it uses filled in), else the record's conversation (or --prompt).
    CaptionError(read) when the record cannot give them."""
    if spec is not None and spec.prompt is not None:
        return (("user", spec.user_text(record, answers)),)
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
    (with ``detail`` when ``image_detail`` is given).

    Images come before any text of a prompt, so the prompts of one image with the same system
    prompt share everything up to the end of the images: a server's prefix cache (OpenAI's,
    vLLM's) serves that part of the second and later prompts as cached input tokens.
    """
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


def params_head(model: str, params: dict) -> bytes:
    """The start of a request body: model and parameters, without the closing brace."""
    return _COMPACT_JSON.encode({"model": model, **params}).encode("utf-8")[:-1]


def build_body(model: str, params: dict, messages: list[dict]) -> bytes:
    """A chat completion request body (built off the event loop: data URLs make it large)."""
    return (params_head(model, params) + b',"messages":'
            + _COMPACT_JSON.encode(messages).encode("utf-8") + b"}")


def refused_param(status: int, body, params: dict) -> str | None:
    """The parameter of ``params`` that a 400/422 answer refuses, if it names one."""
    if status not in (400, 422):
        return None
    error = body.get("error", body) if isinstance(body, dict) else body
    named = error.get("param") if isinstance(error, dict) else None
    if named in params:
        return named
    message = str(error.get("message", "") if isinstance(error, dict) else error)
    if not _REFUSAL_WORDS.search(message):
        return None
    for name in params:
        if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", message):
            return name
    return None


class AcceptedParams:
    """What this endpoint accepts, learned from its refusals; one per client.

    Requests are built with the parameters as asked (the completion limit spelled
    ``max_completion_tokens``; prompts may set their own); ``accept`` gives the parameters as
    this endpoint takes them, ``body`` a request body rewritten to match.
    """

    def __init__(self, model: str):
        self._model = model
        self._limit: str | None = LIMIT_SPELLINGS[0]  # how the limit is spelled; None: dropped
        self._dropped: set[str] = set()

    def accept(self, params: dict) -> dict:
        """``params`` (as a request was built) spelled the way the endpoint accepts them."""
        if self._limit == LIMIT_SPELLINGS[0] and not self._dropped:
            return params
        accepted = {}
        for name, value in params.items():
            if name == LIMIT_SPELLINGS[0]:
                if self._limit is not None:
                    accepted[self._limit] = value
            elif name not in self._dropped:
                accepted[name] = value
        return accepted

    def body(self, body: bytes, params: dict) -> tuple[bytes, dict]:
        """A body built with ``params`` (``build_body``), rewritten to what the endpoint accepts,
        and the parameters it now carries."""
        accepted = self.accept(params)
        if accepted is params:
            return body, params
        head = params_head(self._model, params)
        return params_head(self._model, accepted) + body[len(head):], accepted

    def adapt(self, name: str, model_text: str) -> None:
        """Stop sending ``name`` as it is: the other spelling, else none. Requests already on the
        wire with the old parameters may be refused too; their retry needs no second change."""
        if name in LIMIT_SPELLINGS:
            if name != self._limit:
                return  # another request changed it already
            if name == LIMIT_SPELLINGS[0]:
                self._limit = LIMIT_SPELLINGS[1]
                _LOG.warning("%s refuses %s: sending the completion limit as %s from now on",
                             model_text, name, self._limit)
                return
            self._limit = None
        elif name in self._dropped:
            return
        else:
            self._dropped.add(name)
        _LOG.warning("%s refuses %s: running without it from now on", model_text, name)

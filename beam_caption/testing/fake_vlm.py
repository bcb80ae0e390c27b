"""A fake OpenAI-compatible vision-language-model server for tests, the demo and benchmarks.

Captions are derived from image content (orientation and mean colour), so a test can compute the
expected caption from the original image with :func:`caption_for_images`. Faults (429, 5xx,
connection resets, malformed / empty / HTML bodies, hangs) are injected at configurable rates
from a seeded RNG; ``fail_first`` makes retries deterministic per request content.

Run standalone: ``python -m beam_caption.testing.fake_vlm --port 8000 [--latency_ms 100] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import operator
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web
from PIL import ExifTags, Image

from beam_caption.testing.fake_batches import FakeBatchAPI, endless_body

FAULTS = ("429", "500", "reset", "malformed", "empty", "html", "hang")
LISTENING = "fake VLM listening on "
_ROLES = ("system", "user", "assistant")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose width and height
_LEVELS = range(256)
_DRAFT_SIDE = 64  # JPEGs are decoded at reduced scale, no smaller than this
_MAX_BODY_BYTES = 64 * 1024 * 1024
_MALFORMED_BODY = b'{"id": "chatcmpl-fake", "choices": ['
_ENDLESS_CHUNK = b" " * 65536
REASONING_TOKENS = {"minimal": 0, "low": 64, "medium": 192, "high": 768}
DEFAULT_EFFORT = "medium"
_REFUSAL_TEXT = "I'm sorry, but I can't help with that."
JUDGE_SCORES = {"low": 2, "fine": 8, "strong": 9}  # a fake judge's scores (FakeVLMConfig)
STRONG_CAPTION = "A strong caption: "
DEGENERATE = ("loop", "text_refusal", "short")  # answers that are not captions (see FakeVLMConfig)
TEXT_REFUSAL = "I'm sorry, but I can't help with describing this image."
SHORT_ANSWER = "Red."
LOOP_PHRASE = " and a wall"
LOOP_CHARS = 2000
_REFUSALS = {401: ("Incorrect API key provided.", "invalid_api_key"),
             403: ("You do not have access to this model.", "permission_denied"),
             404: ("The model does not exist or you do not have access to it.",
                   "model_not_found")}
_HTML_BODY = "<html><body><h1>Service temporarily unavailable</h1></body></html>"


@dataclass
class FakeVLMConfig:
    """Behaviour of a :class:`FakeVLMServer`. Rates are per-request probabilities (sum <= 1)."""

    models: tuple[str, ...] = ("fake-vlm",)
    api_key: str | None = None
    latency_ms: float = 0
    rate_429: float = 0
    rate_500: float = 0
    rate_reset: float = 0
    rate_malformed: float = 0
    rate_empty: float = 0
    rate_html: float = 0
    rate_hang: float = 0
    hang_seconds: float = 3600
    retry_after: float | None = None
    retry_after_ms: float | None = None
    fail_first: int = 0
    fail_first_status: int = 503
    reject_400_marker: str | None = "REJECT_400"
    seed: int = 0
    token_patch_px: int = 28
    # Hostile answers, as real gateways give them:
    caption_suffix: str = ""  # appended to every caption (e.g. a lone surrogate "\ud800")
    caption_chars: int = 0  # pad every caption to at least this many characters
    usage: Any = None  # replaces the usage block as given (strings, NaN, 10**31, {}, "x", ...)
    omit_usage: bool = False  # answers carry no usage block at all
    answer_headers: dict[str, str] | None = None  # added to every chat answer (e.g. hostile
    # x-ratelimit-* headers: a reset of 999999h, a limit of 0.0000001)
    endless_body: bool = False  # successful answers stream a body that never ends
    echo_auth: bool = False  # error bodies quote the request's Authorization header
    refuse_after: int | None = None  # after this many captions, answer refuse_status to all
    refuse_status: int = 401
    # Model rules:
    reasoning: bool = False  # the models follow OpenAI's reasoning-model rules (see README)
    reasoning_ms_per_token: float = 0.5  # extra latency per reasoning token
    legacy_params: bool = False  # refuses max_completion_tokens (older servers know max_tokens)
    refusal_marker: str | None = "REFUSE_ME"  # a prompt holding it gets a refusal answer
    # Answers that are not captions, with finish_reason "stop" as small models give them
    # (DEGENERATE): a repetition loop (the caption, then LOOP_PHRASE repeated to LOOP_CHARS), a
    # refusal written as the answer text (TEXT_REFUSAL, the refusal field empty), a short
    # answer (SHORT_ANSWER). A prompt holding a marker always gets one; the rates pick requests
    # by their messages' content (images and prompts: the same request, the same draw), which
    # get one for their first answer only, or with ``degenerate_always`` for every answer.
    # Structured answers are filled from the degenerate text.
    loop_marker: str | None = "LOOP_ME"
    text_refusal_marker: str | None = "REFUSE_IN_TEXT"
    short_marker: str | None = "ANSWER_SHORT"
    rate_loop: float = 0
    rate_text_refusal: float = 0
    rate_short: float = 0
    degenerate_always: bool = False
    # Structured output (response_format json_schema): answers fill the schema from the caption
    # (structured_answer); these give answers that do not conform instead:
    schema_marker: str | None = "BREAK_SCHEMA"  # a prompt holding it, always
    schema_break_first: int = 0  # the first N answers for each distinct request
    # Stages and judges (core/stages.py): a model whose name holds ``strong_marker`` answers
    # "A strong caption: ..." where the others answer "A fake caption: ...". A judge's answer
    # (a schema with a number "score") scores JUDGE_SCORES["strong"] for a request showing a
    # strong caption, else JUDGE_SCORES["low"] for one holding ``low_score_marker`` or drawn
    # at ``rate_low_score`` (by the request's content), else JUDGE_SCORES["fine"].
    strong_marker: str = "strong"
    low_score_marker: str | None = "LOW_SCORE"
    rate_low_score: float = 0
    # Batch API (/v1/files, /v1/batches; fake_batches.py):
    batch_delay_s: float = 0.0  # from a batch's creation to its end
    batch_expire: bool = False  # batches expire: only the first half of their lines answered
    batch_fail_marker: str | None = "BATCH_FAIL"  # a line whose prompt holds it errors (500)
    # An account's rate limits, enforced across all clients with 429s as OpenAI does: buckets
    # refilled at the limit per minute, holding ``account_burst_s`` seconds of it. Requests
    # are charged on arrival, tokens as prompt tokens plus max_tokens (or 0).
    account_rpm: float | None = None
    account_tpm: float | None = None
    account_burst_s: float = 60.0
    account_headers: bool = True  # answers carry x-ratelimit-limit/remaining/reset-* headers
    # Prefix caching, as vLLM's and OpenAI's: an answer whose request starts as an earlier one
    # did, up to and including its last image (same model), reports that prefix's prompt
    # tokens in usage.prompt_tokens_details.cached_tokens. The last this many prefixes are
    # remembered (0: no caching); requests without images are never served from it.
    prefix_cache_entries: int = 256

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        if not self.models:
            raise ValueError("models must not be empty")
        rates = [self.fault_rate(kind) for kind in FAULTS]
        if any(not 0 <= rate <= 1 for rate in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError("fault rates must be in [0, 1] and sum to at most 1")
        rates = [self.degenerate_rate(kind) for kind in DEGENERATE]
        if any(not 0 <= rate <= 1 for rate in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError("degenerate answer rates must be in [0, 1] and sum to at most 1")
        if self.latency_ms < 0 or self.hang_seconds < 0 or self.fail_first < 0:
            raise ValueError("latency_ms, hang_seconds and fail_first must be >= 0")
        if self.token_patch_px < 1:
            raise ValueError("token_patch_px must be >= 1")
        if any(limit is not None and limit <= 0 for limit in (self.account_rpm,
                                                              self.account_tpm)) \
                or self.account_burst_s <= 0:
            raise ValueError("account_rpm, account_tpm and account_burst_s must be > 0")

    def fault_rate(self, kind: str) -> float:
        """The configured rate of fault ``kind`` (one of FAULTS)."""
        return getattr(self, f"rate_{kind}")

    def degenerate_rate(self, kind: str) -> float:
        """The configured rate of degenerate answer ``kind`` (one of DEGENERATE)."""
        return getattr(self, f"rate_{kind}")

    def degenerate_marker(self, kind: str) -> str | None:
        """The prompt marker of degenerate answer ``kind`` (one of DEGENERATE)."""
        return getattr(self, f"{kind}_marker")


# ---------------------------------------------------------------------------------------------
# Captions


def describe_image(img: Image.Image) -> str:
    """One image's part of the caption: ``"<orientation> image, colour #rrggbb"``."""
    width, height = img.size
    if img.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    if width > height * 1.05:
        orientation = "landscape"
    elif height > width * 1.05:
        orientation = "portrait"
    else:
        orientation = "square"
    return f"{orientation} image, colour {_mean_colour_hex(img)}"


def caption_for_images(images: list[Image.Image]) -> str:
    """The caption the fake server answers for these images (as in the original files)."""
    return _caption([describe_image(img) for img in images])


def _caption(descriptions: list[str]) -> str:
    return "A fake caption: " + ("; ".join(descriptions) if descriptions else "no image")


def degenerate_text(kind: str, caption: str) -> str:
    """The answer of degenerate ``kind`` (one of DEGENERATE) for a request whose caption is
    ``caption``."""
    if kind == "loop":
        return caption + LOOP_PHRASE * max(1, (LOOP_CHARS - len(caption)) // len(LOOP_PHRASE))
    return TEXT_REFUSAL if kind == "text_refusal" else SHORT_ANSWER


def _mean_colour_hex(img: Image.Image) -> str:
    """Mean RGB of the image on white, each channel rounded to a multiple of 51, as #rrggbb."""
    rgb = _to_rgb(img)
    histogram, pixels = rgb.histogram(), rgb.width * rgb.height
    means = (sum(map(operator.mul, _LEVELS, histogram[band * 256:(band + 1) * 256])) / pixels
             for band in range(3))
    return "#" + "".join(f"{min(255, int(mean / 51 + 0.5) * 51):02x}" for mean in means)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of ``img``: 16-bit scaled to 8-bit, transparency composited onto white."""
    if img.mode.startswith("I"):
        img = img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Requests


class _APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {
            "error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


class _Message(NamedTuple):
    role: str
    texts: list[str]
    image_urls: list[str]


class _Chat(NamedTuple):
    model: str
    messages: list[_Message]
    max_tokens: int | None
    raw_messages: Any  # as sent (validated by _parse_messages)
    reasoning_effort: str | None = None
    response_format: dict | None = None


class _DecodedImage(NamedTuple):
    size: tuple[int, int]
    description: str


def _parse_chat(raw: bytes, config: FakeVLMConfig) -> _Chat:
    """Validate a chat completion request body like a real server does."""
    models = config.models
    try:
        body = json.loads(raw)
    except ValueError:
        raise _APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _APIError(400, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _APIError(400, "you must provide a model parameter", param="model",
                        code="missing_required_parameter")
    if model not in models:
        raise _APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                        param="model", code="model_not_found")
    if body.get("stream"):
        raise _APIError(400, "streaming not supported by fake", param="stream")
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise _APIError(400, "temperature must be a number between 0 and 2", param="temperature")
    messages = body.get("messages")
    _check_model_rules(body, config)
    return _Chat(model, _parse_messages(messages), _parse_max_tokens(body), messages,
                 body.get("reasoning_effort"), _parse_response_format(body))


def _parse_response_format(body: dict) -> dict | None:
    """response_format as OpenAI checks it: text, json_object, or json_schema with a name and
    an object schema."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _APIError(400, "Invalid value for 'response_format.type'.", param="response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or \
                not isinstance(spec.get("schema"), dict):
            raise _APIError(400, "response_format.json_schema needs a name and a schema object.",
                            param="response_format")
    return value


def structured_answer(schema: dict, caption: str) -> Any:
    """The JSON value the fake answers for ``schema``: derived from the caption, conforming
    (objects fill every property, strings are the caption, arrays its distinct words, numbers
    its word count, booleans true, enums their first value)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {name: structured_answer(sub, caption)
                for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        words = list(dict.fromkeys(word.strip(",.;:") for word in caption.split()))
        items = schema.get("items", {"type": "string"})
        count = max(1, min(len(words), schema.get("maxItems", 5)))
        if items.get("type", "string") == "string" and "enum" not in items:
            return words[:count]
        return [structured_answer(items, caption)] * max(1, schema.get("minItems", 1))
    if kind in ("integer", "number"):
        return len(caption.split())
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return caption


def _check_model_rules(body: dict, config: FakeVLMConfig) -> None:
    """Refuse parameters as OpenAI's reasoning models, its chat models or older servers do."""
    if config.legacy_params and "max_completion_tokens" in body:
        raise _APIError(400, "Unrecognized request argument supplied: max_completion_tokens")
    effort = body.get("reasoning_effort")
    if not config.reasoning:
        if effort is not None:
            raise _APIError(400, "Unrecognized request argument supplied: reasoning_effort")
        return
    if "max_tokens" in body:
        raise _APIError(400, "Unsupported parameter: 'max_tokens' is not supported with this "
                             "model. Use 'max_completion_tokens' instead.", param="max_tokens",
                        code="unsupported_parameter")
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise _APIError(400, f"Unsupported value: 'temperature' does not support {temperature} "
                             "with this model. Only the default (1) value is supported.",
                        param="temperature", code="unsupported_value")
    if effort is not None and effort not in REASONING_TOKENS:
        raise _APIError(400, f"Invalid value: '{effort}'. Supported values are: "
                             f"{', '.join(map(repr, REASONING_TOKENS))}.",
                        param="reasoning_effort", code="invalid_value")


def _parse_max_tokens(body: dict) -> int | None:
    for param in ("max_completion_tokens", "max_tokens"):
        value = body.get(param)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _APIError(400, f"{param} must be a positive integer", param=param)
            return value
    return None


def _parse_messages(messages: object) -> list[_Message]:
    if not isinstance(messages, list) or not messages:
        raise _APIError(400, "messages must be a non-empty array", param="messages")
    parsed = [_parse_message(message, f"messages[{i}]") for i, message in enumerate(messages)]
    if not any(message.role == "user" for message in parsed):
        raise _APIError(400, "messages must contain at least one user message", param="messages")
    return parsed


def _parse_message(message: object, param: str) -> _Message:
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise _APIError(400, f"{param} must be an object with role in {_ROLES}", param=param)
    content = message.get("content")
    if isinstance(content, str):
        return _Message(message["role"], [content], [])
    if not isinstance(content, list):
        raise _APIError(400, f"{param}.content must be a string or an array",
                        param=f"{param}.content")
    texts, image_urls = [], []
    for j, part in enumerate(content):
        part_param = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                and isinstance(part["image_url"].get("url"), str):
            image_urls.append(part["image_url"]["url"])
        else:
            raise _APIError(400, f"{part_param} must be a text or image_url part", param=part_param)
    return _Message(message["role"], texts, image_urls)


def _content_digest(chat: _Chat) -> str:
    """A digest of a request's messages (images and prompts, not its parameters)."""
    return hashlib.sha256(json.dumps(chat.raw_messages, sort_keys=True).encode()).hexdigest()


def _holds(chat: _Chat, marker: str | None) -> bool:
    """Whether a text of the request holds ``marker``."""
    return marker is not None and marker != "" and any(marker in text for m in chat.messages
                                                       for text in m.texts)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decode_image(url: str) -> _DecodedImage:
    """Decode a base64 image data URL: its size as sent and its caption part."""
    if not url.startswith("data:"):
        raise _APIError(400, "only base64 data: image URLs are supported by this server",
                        param="image_url", code="invalid_image_url")
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise _APIError(400, "image URL must be a base64 data:image/... URL",
                        param="image_url", code="invalid_image")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        size = img.size
        img.draft("RGB", (_DRAFT_SIDE, _DRAFT_SIDE))
        return _DecodedImage(size, describe_image(img))
    except (binascii.Error, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _APIError(400, f"could not decode image: {exc}", param="image_url",
                        code="invalid_image") from None


def _status_error(status: int, retry_headers: dict[str, str]) -> _APIError:
    """The error a gateway answers with ``status``; 429s carry the retry headers."""
    if status == 429:
        return _APIError(429, "Rate limit reached (fake).", type="requests",
                         code="rate_limit_exceeded", headers=retry_headers)
    if status >= 500:
        return _APIError(status, "The server had an error processing your request (fake).",
                         type="server_error")
    return _APIError(status, f"Injected HTTP {status} (fake).")


# ---------------------------------------------------------------------------------------------
# Server


class _AccountBucket:
    """One resource of a fake account: refilled at ``per_minute``, up to ``burst_s`` of it."""

    def __init__(self, per_minute: float, burst_s: float):
        self.per_minute = per_minute
        self._rate = per_minute / 60
        self._capacity = self._rate * burst_s
        self._level = self._capacity
        self._stamp = time.monotonic()

    def take(self, amount: float) -> bool:
        """Charge ``amount`` if the account has it (a charge above the capacity waits for a full
        bucket and takes it all)."""
        now = time.monotonic()
        self._level = min(self._capacity, self._level + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._level >= min(amount, self._capacity):
            self._level -= amount
            return True
        return False

    def refund(self, amount: float) -> None:
        self._level = min(self._capacity, self._level + amount)

    def headers(self, resource: str) -> dict[str, str]:
        reset_s = max(0.0, self._capacity - self._level) / self._rate
        return {f"x-ratelimit-limit-{resource}": _header_number(self.per_minute),
                f"x-ratelimit-remaining-{resource}": str(max(0, math.floor(self._level))),
                f"x-ratelimit-reset-{resource}": f"{reset_s:.3f}s"}


class _Stats:
    """Thread-safe counters: mutated on the server loop, read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests = self._succeeded = self._images = 0
            self._max_in_flight = self._in_flight
            self._by_status: dict[str, int] = {}
            self._faults: dict[str, int] = {}
            self._by_caption: dict[str, int] = {}
            self._events: dict[str, int] = {}

    def event(self, kind: str) -> None:
        """Count a Batch API event (upload, batch, ...)."""
        with self._lock:
            self._events[kind] = self._events.get(kind, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self._requests, "succeeded": self._succeeded,
                    "events": dict(self._events),
                    "by_status": dict(self._by_status), "faults": dict(self._faults),
                    "in_flight": self._in_flight, "max_in_flight": self._max_in_flight,
                    "images": self._images, "by_caption": dict(self._by_caption)}

    def begin(self) -> None:
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def end(self, status: int | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if status is not None:
                key = str(status)
                self._by_status[key] = self._by_status.get(key, 0) + 1

    def fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] = self._faults.get(kind, 0) + 1

    def succeeded(self, caption: str, images: int) -> None:
        with self._lock:
            self._succeeded += 1
            self._images += images
            self._by_caption[caption] = self._by_caption.get(caption, 0) + 1


def _loopback_host(host: str) -> str:
    """``host`` as an IP literal, or ValueError unless it is a loopback address."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"the fake VLM server binds loopback addresses only, not {host!r}")


def _header_number(value: float) -> str:
    return f"{value:g}"


class FakeVLMServer:
    """The fake server, run on its own event loop in a background thread.

    ``with FakeVLMServer(FakeVLMConfig(latency_ms=50)) as server:`` then send requests to
    ``server.url``; ``server.stats()`` returns the counters served at ``GET /stats``.
    """

    def __init__(self, config: FakeVLMConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.config = config or FakeVLMConfig()
        self.host = _loopback_host(host)
        self._requested_port = port
        self._port: int | None = None
        self._stats = _Stats()
        self._rng = random.Random(self.config.seed)
        self._fault_rates = [(kind, self.config.fault_rate(kind)) for kind in FAULTS
                             if self.config.fault_rate(kind) > 0]
        self._fail_counts: dict[str, int] = {}
        self._retry_headers = self._make_retry_headers()
        config = self.config
        self._account = {resource: _AccountBucket(limit, config.account_burst_s)
                         for resource, limit in (("requests", config.account_rpm),
                                                 ("tokens", config.account_tpm)) if limit}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._batches = FakeBatchAPI(self)
        self._prefixes: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._prefixes_lock = threading.Lock()  # batch lines are answered off the loop

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeVLMServer:
        """Start serving in a background thread; return once listening."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-vlm",
                                        daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving (in-flight requests are cancelled after a short grace period)."""
        if self._thread is None:
            return
        loop = self._loop
        assert loop is not None  # set with the thread
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result()
            self._runner = None
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join()
        loop.close()
        self._thread = self._loop = None

    def __enter__(self) -> FakeVLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the OpenAI-compatible API, ending in /v1."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def stats(self) -> dict:
        """A snapshot of the request counters."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    async def _open(self) -> None:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.add_routes([
            web.post("/v1/chat/completions", self._handle_chat),
            web.get("/v1/models", self._handle_models),
            web.get("/stats", self._handle_stats),
            web.post("/stats/reset", self._handle_stats_reset),
            *self._batches.routes(),
        ])
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                               shutdown_timeout=0.25)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, self.host, self._requested_port).start()
        self._port = runner.addresses[0][1]

    def _make_retry_headers(self) -> dict[str, str]:
        headers = {}
        if self.config.retry_after is not None:
            headers["Retry-After"] = _header_number(self.config.retry_after)
        if self.config.retry_after_ms is not None:
            headers["retry-after-ms"] = _header_number(self.config.retry_after_ms)
        return headers

    # -- handlers -------------------------------------------------------------------------------

    async def _handle_models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except _APIError as exc:
            return self._error_response(exc, request)
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "owned_by": "fake"} for model in self.config.models]})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._stats.snapshot())

    async def _handle_stats_reset(self, request: web.Request) -> web.Response:
        self._stats.reset()
        return web.json_response(self._stats.snapshot())

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        """Count the request around :meth:`_answer_chat` (and add ``answer_headers``)."""
        self._stats.begin()
        status = None
        try:
            response = await self._answer_chat(request)
            status = response.status
            if self.config.answer_headers and not response.prepared:
                response.headers.update(self.config.answer_headers)
            return response
        except web.HTTPException as exc:  # e.g. 413 from aiohttp itself
            status = exc.status
            raise
        finally:
            self._stats.end(status)

    async def _answer_chat(self, request: web.Request) -> web.StreamResponse:
        """Auth, fault injection, validation, latency, answer — in that order."""
        try:
            self._check_auth(request)
            self._check_refusal(request)
            raw = await request.read()
            fault = self._draw_fault()
            if fault is not None:
                self._stats.fault(fault)
                response = await self._inject(fault, request)
                if response is not None:
                    return response
            chat = _parse_chat(raw, self.config)
            self._check_reject_marker(chat)
            images = [[_decode_image(url) for url in m.image_urls] for m in chat.messages]
            limit_headers = self._charge_account(chat, images)
            self._check_fail_first(chat)
        except _APIError as exc:
            return self._error_response(exc, request)
        reasoning = self._reasoning_tokens(chat)
        latency_ms = self.config.latency_ms + reasoning * self.config.reasoning_ms_per_token
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        if self.config.endless_body:
            return await self._endless(request)
        response = self._completion(chat, images, reasoning)
        response.headers.update(limit_headers)
        return response

    def _charge_account(self, chat: _Chat, images: list[list[_DecodedImage]]) -> dict:
        """Charge the request to the account's limits; its x-ratelimit headers, or a 429 with
        them when a limit is spent (nothing is charged then)."""
        if not self._account:
            return {}
        tokens = (sum(self._message_tokens(m, imgs)
                      for m, imgs in zip(chat.messages, images, strict=True))
                  + (chat.max_tokens or 0))
        costs = {"requests": 1, "tokens": tokens}
        spent = [resource for resource, bucket in self._account.items()
                 if not bucket.take(costs[resource])]
        for resource in self._account:  # a refused request is charged nothing
            if spent and resource not in spent:
                self._account[resource].refund(costs[resource])
        headers: dict[str, str] = {}
        if self.config.account_headers:
            for resource, bucket in self._account.items():
                headers.update(bucket.headers(resource))
        if spent:
            self._stats.fault("account_limit")
            raise _APIError(429, f"Rate limit reached for {spent[0]} (fake account).",
                            type=spent[0], code="rate_limit_exceeded",
                            headers={**self._retry_headers, **headers})
        return headers

    def _reasoning_tokens(self, chat: _Chat) -> int:
        """Tokens a reasoning model thinks before answering (0 for chat models)."""
        if not self.config.reasoning:
            return 0
        return REASONING_TOKENS[chat.reasoning_effort or DEFAULT_EFFORT]

    def _error_response(self, exc: _APIError, request: web.Request) -> web.Response:
        """The error answer; with ``echo_auth`` its message quotes the Authorization header."""
        if self.config.echo_auth:
            exc.body["error"]["message"] += (
                f" (request header Authorization: {request.headers.get('Authorization', '')})")
        return exc.response()

    def refusal(self, request: web.Request) -> web.Response | None:
        """The 401 answer when a request lacks the configured key, else None."""
        try:
            self._check_auth(request)
        except _APIError as exc:
            return self._error_response(exc, request)
        return None

    def count_event(self, kind: str) -> None:
        self._stats.event(kind)

    def _check_auth(self, request: web.Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise _APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _check_refusal(self, request: web.Request) -> None:
        """After ``refuse_after`` captions, refuse everything (key revoked, model withdrawn)."""
        after = self.config.refuse_after
        if after is not None and self._stats.snapshot()["succeeded"] >= after:
            status = self.config.refuse_status
            message, code = _REFUSALS.get(status, (f"Refused (HTTP {status}).", None))
            raise _APIError(status, message, code=code)

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        """A 200 answer whose JSON body never ends (until the client goes or 2 GiB are sent)."""
        return await endless_body(request, "application/json",
                                  b'{"choices": [{"message": {"content": "', _ENDLESS_CHUNK)

    def _draw_fault(self) -> str | None:
        if not self._fault_rates:
            return None
        draw = self._rng.random()
        for kind, rate in self._fault_rates:
            if draw < rate:
                return kind
            draw -= rate
        return None

    async def _inject(self, fault: str, request: web.Request) -> web.StreamResponse | None:
        """Act out ``fault``: raise an error, return a bad response, or return None to go on."""
        if fault == "429":
            raise _status_error(429, self._retry_headers)
        if fault == "500":
            raise _status_error(self._rng.choice((500, 502, 503)), self._retry_headers)
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # aiohttp drops the connection without a response
        if fault == "malformed":
            return web.Response(body=_MALFORMED_BODY, content_type="application/json")
        if fault == "empty":
            return web.Response(body=b"", content_type="application/json")
        if fault == "html":
            return web.Response(text=_HTML_BODY, content_type="text/html")
        if fault == "hang":
            await asyncio.sleep(self.config.hang_seconds)
            return None
        raise AssertionError(f"unknown fault {fault!r}")

    def _check_reject_marker(self, chat: _Chat) -> None:
        if _holds(chat, self.config.reject_400_marker):
            raise _APIError(400, "Your request was rejected by the content policy (fake).",
                            code="content_policy_violation")

    def _check_fail_first(self, chat: _Chat) -> None:
        """Fail the first ``fail_first`` requests with the same messages."""
        if not self.config.fail_first:
            return
        digest = _content_digest(chat)
        seen = self._fail_counts.get(digest, 0)
        if seen < self.config.fail_first:
            self._fail_counts[digest] = seen + 1
            self._stats.fault("fail_first")
            raise _status_error(self.config.fail_first_status, self._retry_headers)

    def _completion(self, chat: _Chat, images: list[list[_DecodedImage]],
                    reasoning: int = 0) -> web.Response:
        return web.json_response(self._completion_body(chat, images, reasoning))

    def answer_line(self, raw: bytes) -> tuple[int, dict]:
        """(status, body) of one chat request of a batch input file: validated and answered as
        :meth:`_answer_chat` does, without latency, faults or account limits."""
        try:
            chat = _parse_chat(raw, self.config)
            self._check_reject_marker(chat)
            images = [[_decode_image(url) for url in m.image_urls] for m in chat.messages]
        except _APIError as exc:
            return exc.status, exc.body
        return 200, self._completion_body(chat, images, self._reasoning_tokens(chat))

    def _completion_body(self, chat: _Chat, images: list[list[_DecodedImage]],
                         reasoning: int = 0) -> dict:
        """The chat.completion answer: caption of all the request's images in order, and usage.

        Reasoning tokens count against the completion limit first: a limit they use up gives
        empty content and finish_reason "length", as OpenAI's reasoning models do.
        """
        text = self._degenerate(chat, _caption([image.description for imgs in images
                                                for image in imgs]))
        if self.config.strong_marker in chat.model:
            text = text.replace("A fake caption: ", STRONG_CAPTION, 1)
        if chat.response_format and chat.response_format["type"] != "text":
            text = self._structured_text(chat, text)
        caption: str | None = (text.ljust(self.config.caption_chars, ".")
                               + self.config.caption_suffix)
        refusal = None
        if _holds(chat, self.config.refusal_marker):
            caption, refusal = None, _REFUSAL_TEXT
        text_tokens = math.ceil(len(caption) / 4) if caption else 0
        finish_reason = "stop"
        limit = chat.max_tokens
        if limit is not None and limit < reasoning + text_tokens:
            reasoning = min(reasoning, limit)
            text_tokens = limit - reasoning
            caption = caption[:text_tokens * 4] if caption else caption
            finish_reason = "length"
        completion_tokens = reasoning + text_tokens
        prompt_tokens = sum(self._message_tokens(m, imgs)
                            for m, imgs in zip(chat.messages, images, strict=True))
        n_images = sum(len(imgs) for imgs in images)
        if caption:
            self._stats.succeeded(caption, n_images)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
        cached = self._cached_tokens(chat, images)
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        if self.config.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": caption,
                                                 "refusal": refusal},
                         "finish_reason": finish_reason}],
            **({} if self.config.omit_usage else
               {"usage": usage if self.config.usage is None else self.config.usage}),
        }

    def _cached_tokens(self, chat: _Chat, images: list[list[_DecodedImage]]) -> int:
        """The prompt tokens of the request's prefix up to and including its last image when an
        earlier request had that prefix (``prefix_cache_entries``), else 0; the prefix is
        remembered either way."""
        last = max((i for i, imgs in enumerate(images) if imgs), default=None)
        if not self.config.prefix_cache_entries or last is None:
            return 0
        content = chat.raw_messages[last]["content"]  # a list: it holds images
        cut = max(j for j, part in enumerate(content) if part["type"] == "image_url") + 1
        prefix = [*chat.raw_messages[:last], {**chat.raw_messages[last], "content": content[:cut]}]
        digest = hashlib.sha256(json.dumps([chat.model, prefix], sort_keys=True).encode()
                                ).hexdigest()
        with self._prefixes_lock:
            seen = digest in self._prefixes
            self._prefixes[digest] = None
            self._prefixes.move_to_end(digest)
            while len(self._prefixes) > self.config.prefix_cache_entries:
                self._prefixes.popitem(last=False)
        if not seen:
            return 0
        texts = [part["text"] for part in content[:cut] if part["type"] == "text"]
        return (sum(self._message_tokens(m, imgs)
                    for m, imgs in zip(chat.messages[:last], images[:last], strict=True))
                + self._message_tokens(_Message(chat.messages[last].role, texts, []),
                                       images[last]))

    def _degenerate(self, chat: _Chat, caption: str) -> str:
        """``caption``, or the degenerate answer the request's marker or draw asks for."""
        kind = next((kind for kind in DEGENERATE if _holds(chat, self.config.degenerate_marker(
            kind))), None)
        if kind is None and any(map(self.config.degenerate_rate, DEGENERATE)):
            digest = _content_digest(chat)
            draw = int(hashlib.sha256(f"{self.config.seed}:{digest}".encode()).hexdigest()[:13],
                       16) / 16 ** 13
            for candidate in DEGENERATE:
                if draw < self.config.degenerate_rate(candidate):
                    kind = candidate
                    break
                draw -= self.config.degenerate_rate(candidate)
            if kind is not None and not self.config.degenerate_always:
                first = "degenerate:" + digest
                if self._fail_counts.get(first):
                    return caption
                self._fail_counts[first] = 1
        if kind is None:
            return caption
        self._stats.fault(kind)
        return degenerate_text(kind, caption)

    def _structured_text(self, chat: _Chat, caption: str) -> str:
        """A JSON answer for the request's response_format: conforming, unless the prompt
        holds ``schema_marker`` or it is one of the first ``schema_break_first`` for its
        request."""
        broken = _holds(chat, self.config.schema_marker)
        if self.config.schema_break_first and not broken:
            digest = "schema:" + _content_digest(chat)
            seen = self._fail_counts.get(digest, 0)
            if seen < self.config.schema_break_first:
                self._fail_counts[digest] = seen + 1
                broken = True
        if broken:
            self._stats.fault("schema")
            return json.dumps({"unexpected": caption})
        if chat.response_format["type"] == "json_object":  # type: ignore[index]
            return json.dumps({"caption": caption})
        schema = chat.response_format["json_schema"]["schema"]  # type: ignore[index]
        answer = structured_answer(schema, caption)
        if isinstance(answer, dict) and (schema.get("properties") or {}).get("score", {}).get(
                "type") in ("number", "integer"):
            answer["score"] = self._judge_score(chat)
        return json.dumps(answer)

    def _judge_score(self, chat: _Chat) -> int:
        """A judge's score of the request (see FakeVLMConfig.strong_marker)."""
        if any(STRONG_CAPTION in text for message in chat.messages for text in message.texts):
            return JUDGE_SCORES["strong"]
        draw = int(hashlib.sha256(f"{self.config.seed}:{_content_digest(chat)}".encode())
                   .hexdigest()[:13], 16) / 16 ** 13
        low = _holds(chat, self.config.low_score_marker) or draw < self.config.rate_low_score
        return JUDGE_SCORES["low" if low else "fine"]

    def _message_tokens(self, message: _Message, images: list[_DecodedImage]) -> int:
        patch = self.config.token_patch_px
        return (4 + sum(math.ceil(len(text) / 4) for text in message.texts)
                + sum(math.ceil(w / patch) * math.ceil(h / patch) for (w, h), _ in images))


# ---------------------------------------------------------------------------------------------
# Subprocess and command line


def spawn_fake_vlm(args: Sequence[str] = (), timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """Start the fake server in a child process; return (process, base URL). Caller terminates it.

    The child prints one line on stdout and nothing else; that pipe is closed once read.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "beam_caption.testing.fake_vlm", "--port", "0", *args],
        stdout=subprocess.PIPE, env=env, text=True)
    line = _read_line(process, timeout)
    assert process.stdout is not None  # stdout=PIPE
    process.stdout.close()
    if not line.startswith(LISTENING):
        process.kill()
        process.wait()
        raise RuntimeError(f"fake VLM server did not start (exit code {process.poll()}): "
                           f"{line!r}")
    return process, line[len(LISTENING):].strip()


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The first stdout line of ``process``; kill it and raise TimeoutError after ``timeout``."""
    lines: list[str] = []
    stdout = process.stdout
    assert stdout is not None  # stdout=PIPE
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines:
        process.kill()
        process.wait()
        raise TimeoutError(f"fake VLM server printed nothing in {timeout} s")
    return lines[0]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m beam_caption.testing.fake_vlm",
                                     description="Fake OpenAI-compatible VLM server.")
    defaults = FakeVLMConfig()
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", dest="models", action="append",
                        help=f"accepted model name, repeatable (default {defaults.models[0]})")
    parser.add_argument("--api_key", help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--latency_ms", type=float, default=0.0)
    for kind in FAULTS:
        parser.add_argument(f"--rate_{kind}", type=float, default=0.0,
                            help=f"probability of a {kind} fault per request")
    parser.add_argument("--hang_seconds", type=float, default=defaults.hang_seconds)
    parser.add_argument("--retry_after", type=float, help="Retry-After seconds on 429s")
    parser.add_argument("--retry_after_ms", type=float, help="retry-after-ms on 429s")
    parser.add_argument("--fail_first", type=int, default=0,
                        help="fail the first N requests for each distinct content")
    parser.add_argument("--fail_first_status", type=int, default=defaults.fail_first_status)
    parser.add_argument("--reject_400_marker", default=defaults.reject_400_marker)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption_suffix", default="", help="appended to every caption")
    parser.add_argument("--caption_chars", type=int, default=0,
                        help="pad every caption to this many characters")
    parser.add_argument("--usage", type=json.loads, help="usage object to answer, as JSON")
    parser.add_argument("--omit_usage", action="store_true", help="answer without usage")
    parser.add_argument("--answer_header", dest="answer_headers", action="append",
                        type=lambda text: tuple(part.strip() for part in text.split(":", 1)),
                        help="NAME: VALUE header added to every chat answer, repeatable")
    parser.add_argument("--endless_body", action="store_true",
                        help="successful answers stream a body that never ends")
    parser.add_argument("--echo_auth", action="store_true",
                        help="error bodies quote the Authorization header")
    parser.add_argument("--refuse_after", type=int,
                        help="after N captions, answer --refuse_status to every request")
    parser.add_argument("--refuse_status", type=int, default=defaults.refuse_status)
    parser.add_argument("--reasoning", action="store_true",
                        help="the models follow OpenAI's reasoning-model rules")
    parser.add_argument("--reasoning_ms_per_token", type=float,
                        default=defaults.reasoning_ms_per_token)
    parser.add_argument("--legacy_params", action="store_true",
                        help="refuse max_completion_tokens as older servers do")
    parser.add_argument("--account_rpm", type=float, help="account requests per minute (429s)")
    parser.add_argument("--account_tpm", type=float, help="account tokens per minute (429s)")
    parser.add_argument("--account_burst_s", type=float, default=defaults.account_burst_s,
                        help="seconds of the account limits a full bucket holds")
    for kind in DEGENERATE:
        parser.add_argument(f"--rate_{kind}", type=float, default=0.0,
                            help=f"share of request contents answered with a {kind} answer")
    parser.add_argument("--degenerate_always", action="store_true",
                        help="a content drawn for a degenerate answer gets it every time, not "
                             "only the first")
    parser.add_argument("--schema_break_first", type=int, default=0,
                        help="the first N structured answers per request do not conform")
    parser.add_argument("--batch_delay_s", type=float, default=0.0,
                        help="seconds from a batch's creation to its end")
    parser.add_argument("--batch_expire", action="store_true",
                        help="batches expire with half of their lines answered")
    parser.add_argument("--no_account_headers", dest="account_headers", action="store_false",
                        help="answer without x-ratelimit-* headers")
    parser.add_argument("--prefix_cache_entries", type=int,
                        default=defaults.prefix_cache_entries,
                        help="request prefixes (up to the last image) remembered to report "
                             "cached_tokens for (0: none)")
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> FakeVLMConfig:
    values = {f.name: getattr(args, f.name) for f in fields(FakeVLMConfig) if hasattr(args, f.name)}
    if values["models"] is None:
        del values["models"]
    values["answer_headers"] = dict(values["answer_headers"] or ())
    return FakeVLMConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the listening line on stdout first."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    with FakeVLMServer(_config_from_args(args), args.host, args.port) as server:
        print(f"{LISTENING}{server.url}", flush=True)
        stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

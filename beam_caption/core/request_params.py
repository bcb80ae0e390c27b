"""The optional request parameters, spelled the way the endpoint accepts them.

Servers disagree: OpenAI's reasoning models (gpt-5, o-series) refuse ``max_tokens`` and any
``temperature`` but the default, older OpenAI-compatible servers refuse
``max_completion_tokens``, and chat models may refuse ``reasoning_effort``. The completion
limit is sent as ``max_completion_tokens`` first (OpenAI accepts it for every model); when a
server answers 400 naming a parameter, the client switches to the other spelling once, or drops
the parameter with one warning, and keeps that choice for the rest of the run.

A request body is built with the parameters first (``{"model", params..., "messages"}``), so
a changed spelling replaces a few bytes at its head instead of re-serializing the images.
"""

from __future__ import annotations

import json
import logging
import re

LIMIT_SPELLINGS = ("max_completion_tokens", "max_tokens")
_REFUSAL_WORDS = re.compile(
    r"unsupported|not supported|unrecognized|unknown|extra|not allowed|not permitted|invalid|"
    r"only the default", re.IGNORECASE)
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))

_LOG = logging.getLogger(__name__)


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

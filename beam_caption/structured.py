"""Structured output: a JSON answer parsed and checked against its prompt's JSON schema.

Models asked for JSON still wrap it in a Markdown fence now and then, or stop half-way; an
answer is accepted when it parses (fence removed) and conforms. One that does not is a
retryable ``response/schema`` error: the client asks again, and records it as a failure once
its retries are spent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema

from beam_caption.errors import CaptionError

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(?P<body>.*?)\n?```\s*$", re.DOTALL)
_MESSAGE_CHARS = 300


def check_schema(schema: dict) -> str | None:
    """Why ``schema`` is not a valid JSON schema (its own draft, else 2020-12), or None."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"{exc.message} (at {'/'.join(map(str, exc.path)) or 'the top'})"
    return None


def answer_checker(json_answer: bool, schema: dict | None) -> Callable[[str], Any] | None:
    """A function that turns an answer's text into the value kept (the parsed JSON), raising a
    retryable CaptionError(response/schema) for one that is not JSON or does not conform;
    None for text answers."""
    if not json_answer:
        return None
    validator = None
    if schema is not None:
        validator = jsonschema.validators.validator_for(schema)(schema)

    def check(text: str) -> Any:
        value = parse_json_answer(text)
        if validator is not None:
            error = jsonschema.exceptions.best_match(validator.iter_errors(value))
            if error is not None:
                where = "/".join(map(str, error.absolute_path)) or "the top"
                raise CaptionError("response", "schema",
                                   f"the answer does not conform to the schema at {where}: "
                                   f"{error.message[:_MESSAGE_CHARS]}", retryable=True)
        return value

    return check


def parse_json_answer(text: str) -> Any:
    """The JSON value of an answer, a Markdown code fence around it removed."""
    fenced = _FENCE.match(text.strip())
    try:
        return json.loads(fenced.group("body") if fenced else text,
                          parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise CaptionError("response", "schema", f"the answer is not JSON: "
                           f"{str(exc)[:_MESSAGE_CHARS]}", retryable=True) from None


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON: an answer holding them would make the outputs invalid."""
    raise ValueError(f"{name} is not a JSON value")

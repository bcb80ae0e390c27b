"""Structured output: a JSON answer parsed and checked against its prompt's JSON schema.

Models asked for JSON still wrap it in a Markdown fence now and then, or stop half-way; an
answer is accepted when it parses (fence removed) and conforms. One that does not is a
retryable ``response/schema`` error: the client asks again, and records it as a failure once
its retries are spent.

The schema is the user's and the answer the server's, and answers are checked on the worker's
event loop, so no check may run long or reach out:

- ``pattern`` and ``patternProperties`` are matched with RE2 (google-re2), which never
  backtracks: linear in the text. RE2 is not Python's ``re``: no backreferences, lookaround
  or possessive quantifiers, ``\\d``/``\\w``/``\\b`` are ASCII, ``$`` is the end of the text
  (as in ECMA 262, which JSON Schema names). A pattern RE2 cannot compile is refused at
  launch (``check_schema``).
- ``$ref`` resolves only within the schema (and the JSON Schema metaschemas): references are
  checked at launch, and the validators' registry retrieves nothing, so no answer fetches.
- ``uniqueItems`` is linear (jsonschema's is quadratic for objects), an answer over
  ``MAX_ANSWER_CHARS`` is not checked, and a check stops after ``MAX_CHECK_SECONDS``
  (``response/schema_check_limit``): a schema's ``anyOf`` nested in ``$ref`` cannot take
  exponential time either.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import jsonschema
import re2
import referencing.exceptions
import referencing.jsonschema
from jsonschema.exceptions import ValidationError
from jsonschema_specifications import REGISTRY as METASCHEMAS
from referencing import Registry

from beam_caption.core.errors import CaptionError, encodable

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(?P<body>.*?)\n?```\s*$", re.DOTALL)
_MESSAGE_CHARS = 300
MAX_ANSWER_CHARS = 1_000_000  # a JSON answer longer than this is not parsed nor checked
MAX_CHECK_SECONDS = 1.0  # one answer's check (a 50 kB answer takes about 0.1 s)
_REF_KEYWORDS = ("$ref", "$dynamicRef")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported once, in our own words


class _CheckTooLong(Exception):
    """An answer's check ran past its MAX_CHECK_SECONDS."""


class _Deadline(threading.local):
    at = 0.0  # time.monotonic() when the check running on this thread must stop


_deadline = _Deadline()


def check_schema(schema: dict) -> str | None:
    """Why ``schema`` cannot check answers, or None: not a valid JSON schema (its own draft,
    else 2020-12), a pattern RE2 cannot compile, or a reference outside the schema."""
    dialect = schema.get("$schema")
    if dialect is not None and (not isinstance(dialect, str) or
                                jsonschema.validators.validator_for(schema, None) is None):
        return (f"$schema {str(dialect)[:_MESSAGE_CHARS]!r} is not a JSON Schema draft this "
                "checker knows (3, 4, 6, 7, 2019-09, 2020-12)")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return (f"the schema is not a valid JSON schema: {exc.message[:_MESSAGE_CHARS]} "
                f"(at {'/'.join(map(str, exc.path)) or 'the top'})")
    return _unusable_part(schema)


def answer_checker(json_answer: bool, schema: dict | None,
                   text_check: Callable[[str], Any] | None = None
                   ) -> Callable[[str], Any] | None:
    """A function that turns an answer's text into the value kept (the parsed JSON), raising a
    retryable CaptionError(response/schema) for one that is not JSON or does not conform, and
    a final CaptionError(response/schema_check_limit) for one too long or costly to check;
    for text answers ``text_check`` (the answer checks, core/answer_checks.py: a JSON answer is
    checked by its schema instead)."""
    if not json_answer:
        return text_check
    validator = None
    if schema is not None:
        validator = _bounded_class(jsonschema.validators.validator_for(schema))(
            schema, registry=Registry())  # retrieves nothing: no $ref reaches the network

    def check(text: str) -> Any:
        if len(text) > MAX_ANSWER_CHARS:
            raise CaptionError("response", "schema_check_limit",
                               f"the answer holds {len(text)} characters, over the "
                               f"{MAX_ANSWER_CHARS} a JSON answer may have")
        value = parse_json_answer(text)
        if validator is not None:
            _deadline.at = time.monotonic() + MAX_CHECK_SECONDS
            try:
                error = jsonschema.exceptions.best_match(validator.iter_errors(value))
            except _CheckTooLong:
                raise CaptionError("response", "schema_check_limit",
                                   f"checking the answer against the schema took over "
                                   f"{MAX_CHECK_SECONDS:g} s") from None
            except (RecursionError, referencing.exceptions.Unresolvable) as exc:
                raise CaptionError("response", "schema_check_limit",
                                   f"the answer could not be checked against the schema "
                                   f"({type(exc).__name__})") from None
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


# The launch check: what jsonschema accepts but could not check safely.

def _unusable_part(schema: dict) -> str | None:
    """The first pattern RE2 refuses or reference outside the schema, as one phrase."""
    specification = referencing.jsonschema.specification_with(
        schema.get("$schema", ""), default=referencing.jsonschema.DRAFT202012)
    root = specification.create_resource(schema)
    registry = METASCHEMAS.combine(Registry().with_resource(root.id() or "", root))
    uses_unevaluated = uses_pattern_properties = False
    pending = [(root, root.id() or "")]
    while pending:
        resource, base = pending.pop()
        contents = resource.contents
        if not isinstance(contents, dict):
            continue
        patterns = list(contents.get("patternProperties") or ())
        if isinstance(contents.get("pattern"), str):
            patterns.append(contents["pattern"])
        for pattern in patterns:
            problem = _re2_problem(pattern)
            if problem:
                return (f"pattern {pattern[:_MESSAGE_CHARS]!r} is not supported: {problem} "
                        "(patterns are matched with RE2: no backreferences, lookaround or "
                        "possessive quantifiers)")
        uses_pattern_properties |= "patternProperties" in contents
        uses_unevaluated |= "unevaluatedProperties" in contents
        for keyword in _REF_KEYWORDS:
            ref = contents.get(keyword)
            if isinstance(ref, str):
                try:
                    registry.resolver(base_uri=base).lookup(ref)
                except referencing.exceptions.Unresolvable:
                    return (f"{keyword} {ref[:_MESSAGE_CHARS]!r} does not point into the "
                            "schema (only references within it, such as #/$defs/name, are "
                            "followed; nothing is fetched)")
        pending += [(sub, urljoin(base, sub.id()) if sub.id() else base)
                    for sub in resource.subresources()]
    if uses_unevaluated and uses_pattern_properties:
        return ("unevaluatedProperties with patternProperties is not supported (jsonschema "
                "would match those patterns with Python's backtracking re)")
    return None


@functools.lru_cache(maxsize=1024)
def _re2(pattern: str):
    return re2.compile(pattern, _RE2_OPTIONS)


def _matches(pattern: str, text: str) -> bool:
    """Whether RE2 finds ``pattern`` in ``text`` (lone surrogates, which UTF-8 cannot hold,
    read as U+FFFD)."""
    return _re2(pattern).search(encodable(text)) is not None


def _re2_problem(pattern: str) -> str | None:
    try:
        _re2(pattern)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return None


# The validator that checks answers: jsonschema's for the schema's draft, with the keywords that
# match patterns or compare items replaced, and every keyword timed.

def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance[:80]!r} does not match {pattern!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for name, value in instance.items():
            if _matches(pattern, name):
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


def _additional_properties(validator, additional, instance, schema):
    """jsonschema's additionalProperties, patternProperties matched with RE2."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [name for name in instance if name not in properties and
              not any(_matches(pattern, name) for pattern in patterns)]
    if validator.is_type(additional, "object"):
        for name in extras:
            yield from validator.descend(instance[name], additional, path=name)
    elif not additional and extras:
        names = ", ".join(map(repr, sorted(extras, key=str)))
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            regexes = ", ".join(map(repr, sorted(schema["patternProperties"])))
            yield ValidationError(f"{names} {verb} not match any of the regexes: {regexes}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({names} {verb} "
                                  "unexpected)")


def _unique_items(validator, unique, instance, schema):
    """uniqueItems in linear time: items compared by a hashable form that JSON equality
    keeps (1 and 1.0 equal, true and 1 not)."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        key = _comparable(item)
        if key in seen:
            yield ValidationError("the array has non-unique elements")
            return
        seen.add(key)


def _comparable(value: Any) -> Any:
    if isinstance(value, dict):
        return ("object", frozenset((name, _comparable(item)) for name, item in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_comparable(item) for item in value))
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    return ("other", value)  # strings and null


_SAFE_KEYWORDS = {"pattern": _pattern, "patternProperties": _pattern_properties,
                  "additionalProperties": _additional_properties, "uniqueItems": _unique_items}


def _timed(keyword: Callable) -> Callable:
    def evaluate(validator, value, instance, schema):
        if time.monotonic() > _deadline.at:
            raise _CheckTooLong
        yield from keyword(validator, value, instance, schema) or ()

    return evaluate


@functools.cache
def _bounded_class(validator_class: type) -> type:
    """``validator_class`` with RE2 patterns, linear uniqueItems, and every keyword stopping
    the check past its deadline."""
    keywords = {**validator_class.VALIDATORS,  # type: ignore[attr-defined]
                **{name: safe for name, safe in _SAFE_KEYWORDS.items()
                   if name in validator_class.VALIDATORS}}  # type: ignore[attr-defined]
    return jsonschema.validators.extend(
        validator_class, {name: _timed(keyword) for name, keyword in keywords.items()})

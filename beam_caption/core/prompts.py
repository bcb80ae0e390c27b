"""Several prompts per image: the ``--prompts_file`` (YAML or JSON) and what each prompt asks.

A prompts file maps names to prompts (at the top level or under ``prompts:``)::

    prompts:
      caption:
        prompt: Describe the image in one sentence.
      tags:
        system: You tag images for a search index.
        prompt: "List the objects you see. The photographer called it: {title}"
        output_key: tags          # default: the prompt's name
        max_tokens: 200           # default: --max_tokens
        temperature: 0            # default: --temperature
        schema:                   # structured output (short for a json_schema response_format)
          type: object
          properties: {objects: {type: array, items: {type: string}}}
          required: [objects]

Stages (core/stages.py): ``{NAME}`` where NAME is another prompt's name or output key is
that prompt's answer (a JSON answer as JSON), which orders the prompts; any other placeholder
is the record's field. A prompt may name its own ``model`` (on the job's endpoint, with its
``price_per_million_input_tokens``/``_output_tokens``; default the job's prices),
``reasoning_effort``, and ``image: false`` to send no image. ``judge: NAME`` makes a prompt
the judge of another: its ``schema`` must require a number ``score`` (1 to 10); with
``threshold`` and ``recaption`` (a model, optionally its own ``api_url``, ``api_key_env`` or
``api_key_file``, prices, ``max_tokens``, ``temperature``, ``reasoning_effort``) a record
whose answer scores below the threshold is asked again with that model.

``{field}`` in ``prompt`` is filled from the record (strings as they are, other values as JSON;
``{{`` is a literal brace; no format spec or conversion such as ``{field:>9}``). A prompt
without ``prompt`` asks the record's conversation turns. The file is read and checked once, at
launch; workers get the parsed prompts, not the file.

The file is bounded: ``MAX_FILE_BYTES``; ``MAX_VALUES`` values, ``MAX_CHARS`` characters and
``MAX_DEPTH`` levels with YAML aliases expanded (a few hundred bytes of nested aliases can stand
for billions of values); no alias may hold itself, and only values JSON can hold are taken (the
schemas are sent as JSON). A prompt filled in over ``MAX_PROMPT_CHARS`` fails its record
(``read/prompt_too_long``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import string
from collections.abc import Sequence
from typing import Any

import fsspec
import yaml

from beam_caption.core.errors import CaptionError, UsageError

MAX_FILE_BYTES = 1 << 20  # a prompts file's size
MAX_VALUES = 100_000  # values (mappings, lists, scalars) in a prompts file, aliases expanded
MAX_CHARS = 1 << 22  # characters of a prompts file's scalars, aliases expanded
MAX_DEPTH = 64  # nesting of a prompts file, aliases expanded
MAX_PROMPT_CHARS = 1 << 20  # a prompt, the record's fields filled in
RESPONSE_TYPES = ("text", "json_object", "json_schema")
RESERVED_KEYS = ("caption_meta",)
_SPEC_KEYS = ("prompt", "system", "output_key", "max_tokens", "temperature", "response_format",
              "schema", "model", "reasoning_effort", "price_per_million_input_tokens",
              "price_per_million_output_tokens", "image", "judge", "threshold", "recaption")
_PRICE_KEYS = ("price_per_million_input_tokens", "price_per_million_output_tokens")
_RECAPTION_KEYS = ("model", "api_url", "api_key_env", "api_key_file", *_PRICE_KEYS,
                   "max_tokens", "temperature", "reasoning_effort")
SCORE_RANGE = (1.0, 10.0)  # a judge's score: its schema's required number "score", 1 to 10


@dataclasses.dataclass(frozen=True)
class ModelRoute:
    """A model other than the job's ``--model`` that a prompt is asked with: a prompt's own
    ``model`` (on the job's endpoint) or a judge's ``recaption`` model (optionally on its own
    endpoint, with its own key). Prices None are the job's; ``max_tokens``, ``temperature`` and
    ``reasoning_effort`` None are the prompt's (then the job's)."""

    model: str
    api_url: str | None = None  # None: the job's --api_url
    api_key_env: str | None = None  # neither: the job's key
    api_key_file: str | None = None
    price_per_million_input_tokens: float | None = None
    price_per_million_output_tokens: float | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    reasoning_effort: str | None = None

    def prices(self, input_price: float, output_price: float) -> tuple[float, float]:
        """(input, output) dollars per million tokens: the route's, else the job's given."""
        return (input_price if self.price_per_million_input_tokens is None
                else self.price_per_million_input_tokens,
                output_price if self.price_per_million_output_tokens is None
                else self.price_per_million_output_tokens)

    def request_params(self) -> dict:
        """Parameters this route sets on top of the prompt's."""
        return {name: value for name, value in (
            ("max_completion_tokens", self.max_tokens), ("temperature", self.temperature),
            ("reasoning_effort", self.reasoning_effort)) if value is not None}


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One question asked of every image.

    ``prompt`` None asks the record's conversation; ``template`` says whether ``{field}``
    placeholders are filled (prompts files) or the text is sent as it is (``--prompt``).
    ``system_prompt`` None sends the job's (``--system_prompt``); ``max_tokens`` and
    ``temperature`` None use the job's. ``response_format`` is sent as OpenAI's parameter;
    a JSON answer is parsed (and checked against its schema) before it is kept.
    """

    name: str
    output_key: str
    prompt: str | None = None
    template: bool = True
    system_prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    response_format: dict | None = None
    # Stages (core/stages.py): a model of its own (None: --model), whether the images are
    # sent, the placeholders filled with other prompts' answers ((placeholder, prompt name)
    # pairs), the prompt this one judges, the score under which that prompt is asked again
    # and the model asked then.
    route: ModelRoute | None = None
    reasoning_effort: str | None = None
    image: bool = True
    inputs: tuple[tuple[str, str], ...] = ()
    judge_of: str | None = None
    threshold: float | None = None
    recaption: ModelRoute | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """The prompts whose answers this one waits for (its inputs, the prompt it judges)."""
        names = [name for _, name in self.inputs]
        return tuple(dict.fromkeys(names + ([self.judge_of] if self.judge_of else [])))

    @property
    def wants_json(self) -> bool:
        return (self.response_format or {}).get("type") in ("json_object", "json_schema")

    @property
    def schema(self) -> dict | None:
        if (self.response_format or {}).get("type") != "json_schema":
            return None
        return self.response_format["json_schema"].get("schema")  # type: ignore[index]

    def request_params(self) -> dict:
        """Parameters this prompt sets on top of the job's."""
        return {name: value for name, value in (
            ("max_completion_tokens", self.max_tokens), ("temperature", self.temperature),
            ("reasoning_effort", self.reasoning_effort),
            ("response_format", self.response_format)) if value is not None}

    def user_text(self, record: dict, answers: dict | None = None) -> str:
        """The prompt with the record's fields and the answers of the prompts it uses
        (``answers``: prompt name -> answer) filled in; CaptionError(read) for a field the
        record lacks, or a prompt that would be longer than MAX_PROMPT_CHARS."""
        assert self.prompt is not None
        if not self.template:
            return self.prompt
        source = {**record, **{placeholder: (answers or {})[name]
                               for placeholder, name in self.inputs}} if self.inputs else record
        pieces = [(literal, field) for literal, field, _, _ in
                  string.Formatter().parse(self.prompt)]
        missing = [field for _, field in pieces if field is not None and field not in source]
        if missing:
            raise CaptionError("read", "missing_prompt_field",
                               f"prompt {self.name!r} needs the record's {missing[0]!r} field")
        values = {field: _as_text(source[field]) for _, field in pieces if field is not None}
        filled = [(literal, "" if field is None else values[field]) for literal, field in pieces]
        length = sum(len(literal) + len(value) for literal, value in filled)
        if length > MAX_PROMPT_CHARS:
            raise CaptionError("read", "prompt_too_long",
                               f"prompt {self.name!r} filled in with the record's fields holds "
                               f"{length} characters, over {MAX_PROMPT_CHARS}")
        return "".join(literal + value for literal, value in filled)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def load_prompts_file(path: str) -> tuple[PromptSpec, ...]:
    """The prompts of a YAML or JSON prompts file (any fsspec path); UsageError for a file
    that cannot be read or a prompt that is not right."""
    source = f"--prompts_file {path}"
    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        text = data.decode("utf-8") if len(data) <= MAX_FILE_BYTES else None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{source}: cannot read it ({type(exc).__name__}: {exc})") from None
    if text is None:
        raise UsageError(f"{source}: longer than {MAX_FILE_BYTES} bytes")
    try:
        document = _load_bounded(text)  # JSON is YAML
        json.dumps(document, allow_nan=False)  # what the requests will send: no date, NaN, set
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"{source}: not YAML or JSON{line}") from None
    except _OverBound as exc:
        raise UsageError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source}: holds a value JSON cannot hold ({exc})") from None
    return parse_prompts(document, source)


class _OverBound(Exception):
    """A prompts file over MAX_VALUES, MAX_CHARS or MAX_DEPTH, or holding itself (the
    reason)."""


class _DepthBoundLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than MAX_DEPTH as it composes (the
    composer recurses: a deep enough file would end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _OverBound(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_bounded(text: str) -> Any:
    """The YAML document in ``text``, measured with its aliases expanded before any Python
    value is made from it; _OverBound for one over the bounds."""
    loader = _DepthBoundLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, 0, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _measure(node: yaml.Node, depth: int, known: dict[int, tuple[int, int, int]],
             open_nodes: set[int]) -> tuple[int, int, int]:
    """``node``'s (values, characters, levels) with aliases expanded, each node measured once
    (``known`` by id); _OverBound past a bound (``depth``: the levels above ``node``) or for a
    node inside itself (``open_nodes``: those being measured)."""
    if depth >= MAX_DEPTH:
        raise _OverBound(f"nested deeper than {MAX_DEPTH} levels (YAML aliases expanded)")
    size = known.get(id(node))
    if size is None:
        if id(node) in open_nodes:
            raise _OverBound("an alias holds itself (a recursive YAML anchor)")
        open_nodes.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            size = (1, len(node.value), 1)
        else:
            values, chars, levels = 1, 0, 1
            children = ([part for pair in node.value for part in pair]
                        if isinstance(node, yaml.MappingNode) else node.value)
            for child in children:
                child_values, child_chars, child_levels = _measure(child, depth + 1, known,
                                                                   open_nodes)
                values, chars = values + child_values, chars + child_chars
                levels = max(levels, child_levels + 1)
                if values > MAX_VALUES or chars > MAX_CHARS:
                    raise _OverBound(f"holds more than {MAX_VALUES} values or {MAX_CHARS} "
                                     "characters (YAML aliases expanded)")
            size = (values, chars, levels)
        open_nodes.discard(id(node))
        known[id(node)] = size
    if depth + size[2] > MAX_DEPTH:
        raise _OverBound(f"nested deeper than {MAX_DEPTH} levels (YAML aliases expanded)")
    return size


def parse_prompts(document: Any, source: str = "prompts") -> tuple[PromptSpec, ...]:
    """Prompts from a parsed prompts document (see the module); UsageError naming what is
    wrong."""
    if isinstance(document, dict) and set(document) == {"prompts"}:
        document = document["prompts"]
    if not isinstance(document, dict) or not document:
        raise UsageError(f"{source}: expected a mapping of prompt names to prompts")
    bad_names = [name for name in document if not str(name).strip() or "|" in str(name)]
    if bad_names:
        raise UsageError(f"{source}: prompt name {bad_names[0]!r} is empty or holds '|' (batch "
                         "requests are named KEY|PROMPT)")
    specs = tuple(_spec(str(name), entry, f"{source}: prompt {name!r}")
                  for name, entry in document.items())
    keys = [spec.output_key for spec in specs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise UsageError(f"{source}: several prompts write output_key {twice[0]!r}")
    return linked_stages(specs, source)


def linked_stages(specs: Sequence[PromptSpec], source: str) -> tuple[PromptSpec, ...]:
    """``specs`` with their inputs resolved, in dependency order; UsageError for a judge that
    is not right, or prompts that wait for each other."""
    by_name = {spec.name: spec for spec in specs}
    by_key = {spec.output_key: spec for spec in specs}
    linked = []
    for spec in specs:
        fields = ([field for _, field, _, _ in string.Formatter().parse(spec.prompt)
                   if field is not None] if spec.prompt is not None else [])
        inputs = []
        for field in dict.fromkeys(fields):
            target = by_name.get(field) or by_key.get(field)
            if target is not None and target.name != spec.name:
                inputs.append((field, target.name))
        linked.append(dataclasses.replace(spec, inputs=tuple(inputs)))
    for spec in linked:
        _check_judge(spec, by_name, linked, f"{source}: prompt {spec.name!r}")
    return _ordered(linked, source)


def _check_judge(spec: PromptSpec, by_name: dict[str, PromptSpec],
                 specs: list[PromptSpec], where: str) -> None:
    if spec.judge_of is None:
        if spec.threshold is not None or spec.recaption is not None:
            raise UsageError(f"{where}: threshold and recaption belong to a judge (judge: NAME)")
        return
    judged = by_name.get(spec.judge_of)
    if judged is None or judged.name == spec.name:
        close = [name for name in by_name if name != spec.name]
        raise UsageError(f"{where}: judge {spec.judge_of!r} names no other prompt (prompts: "
                         f"{', '.join(close)})")
    if judged.judge_of is not None:
        raise UsageError(f"{where}: {judged.name!r} is a judge itself; judge a prompt that "
                         "answers")
    others = [other.name for other in specs
              if other.judge_of == judged.name and other.name != spec.name]
    if others:
        raise UsageError(f"{where}: {judged.name!r} has another judge, {others[0]!r}")
    if judged.name not in [name for _, name in spec.inputs]:
        raise UsageError(f"{where}: a judge's prompt must show the answer it judges: put "
                         f"{{{judged.output_key}}} in it")
    schema = spec.schema or {}
    score = (schema.get("properties") or {}).get("score")
    if not isinstance(score, dict) or score.get("type") not in ("number", "integer") or \
            "score" not in (schema.get("required") or []):
        raise UsageError(f"{where}: a judge needs a schema requiring a number score from "
                         f"{SCORE_RANGE[0]:g} to {SCORE_RANGE[1]:g} (schema: {{type: object, "
                         "properties: {score: {type: number}}, required: [score]})")
    if spec.threshold is not None and not spec.threshold <= SCORE_RANGE[1]:
        raise UsageError(f"{where}: threshold must be a score from {SCORE_RANGE[0]:g} to "
                         f"{SCORE_RANGE[1]:g}, got {spec.threshold:g}")
    if (spec.threshold is None) != (spec.recaption is None):
        raise UsageError(f"{where}: give threshold and recaption together (the records "
                         "scoring below the threshold are asked the recaption model)")


def waits_for(specs: Sequence[PromptSpec]) -> dict[str, tuple[str, ...]]:
    """Each prompt's name -> the prompts it waits for: those it needs, and for a judged prompt
    it needs, that prompt's judge too (its answer is final once judged)."""
    judges = {spec.judge_of: spec.name for spec in specs if spec.judge_of}
    return {spec.name: tuple(dict.fromkeys(
        [*spec.needs, *(judges[name] for name in spec.needs
                        if name in judges and judges[name] != spec.name)]))
        for spec in specs}


def _ordered(specs: list[PromptSpec], source: str) -> tuple[PromptSpec, ...]:
    """``specs`` so that each comes after those it waits for, otherwise in the file's order."""
    waits = waits_for(specs)
    placed: list[PromptSpec] = []
    left = list(specs)
    while left:
        done = {spec.name for spec in placed}
        ready = next((spec for spec in left if set(waits[spec.name]) <= done), None)
        if ready is None:
            raise UsageError(f"{source}: prompts wait for each other's answers: "
                             + " -> ".join(_cycle(left, waits)))
        placed.append(ready)
        left.remove(ready)
    return tuple(placed)


def _cycle(left: list[PromptSpec], waits: dict[str, tuple[str, ...]]) -> list[str]:
    """A cycle among ``left`` (prompts none of which can run), as names, first one repeated."""
    names = {spec.name for spec in left}
    path = [left[0].name]
    while path.count(path[-1]) < 2:
        path.append(next(name for name in waits[path[-1]] if name in names))
    return path[path.index(path[-1]):]


def _spec(name: str, entry: Any, where: str) -> PromptSpec:
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a prompt text or a mapping of {', '.join(_SPEC_KEYS)}")
    _check_keys(entry, _SPEC_KEYS, where)
    output_key = _text(entry, "output_key", where) or name
    if output_key in RESERVED_KEYS:
        raise UsageError(f"{where}: output_key {output_key!r} is reserved")
    prompt = _text(entry, "prompt", where)
    if prompt is not None:
        _check_placeholders(prompt, where)
    model = _text(entry, "model", where)
    if model is None and any(key in entry for key in _PRICE_KEYS):
        raise UsageError(f"{where}: prices need the prompt's own model (the job's model is "
                         "priced by the --price_per_million_* flags)")
    image = entry.get("image", True)
    if not isinstance(image, bool):
        raise UsageError(f"{where}: image must be true or false, got {image!r}")
    return PromptSpec(
        name=name, output_key=output_key, prompt=prompt, template=True,
        system_prompt=_text(entry, "system", where),
        max_tokens=_number(entry, "max_tokens", where, int, 1),
        temperature=_number(entry, "temperature", where, float, 0),
        response_format=_response_format(entry, name, where),
        route=None if model is None else ModelRoute(
            model, **{key: _number(entry, key, where, float, 0) for key in _PRICE_KEYS}),
        reasoning_effort=_text(entry, "reasoning_effort", where), image=image,
        judge_of=_text(entry, "judge", where),
        threshold=_number(entry, "threshold", where, float, SCORE_RANGE[0]),
        recaption=_recaption(entry.get("recaption"), f"{where}: recaption"))


def _check_keys(entry: dict, known: tuple[str, ...], where: str) -> None:
    """UsageError for a key of ``entry`` not in ``known``, with the closest known key."""
    for key in entry:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{where}: unknown key {key!r}{hint}")


def _recaption(entry: Any, where: str) -> ModelRoute | None:
    """A judge's ``recaption`` model (None when not given)."""
    if entry is None:
        return None
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a model name or a mapping of "
                         f"{', '.join(_RECAPTION_KEYS)}")
    _check_keys(entry, _RECAPTION_KEYS, where)
    model = _text(entry, "model", where)
    if model is None:
        raise UsageError(f"{where}: needs the model to ask (model: NAME)")
    if entry.get("api_key_env") and entry.get("api_key_file"):
        raise UsageError(f"{where}: give the key with one of api_key_env and api_key_file")
    return ModelRoute(
        model, api_url=_text(entry, "api_url", where),
        api_key_env=_text(entry, "api_key_env", where),
        api_key_file=_text(entry, "api_key_file", where),
        **{key: _number(entry, key, where, float, 0) for key in _PRICE_KEYS},
        max_tokens=_number(entry, "max_tokens", where, int, 1),
        temperature=_number(entry, "temperature", where, float, 0),
        reasoning_effort=_text(entry, "reasoning_effort", where))


def _check_placeholders(prompt: str, where: str) -> None:
    """Refuse a placeholder that is not a plain ``{field}``: a format spec or conversion could
    name other fields or pad a prompt to any length."""
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        raise UsageError(f"{where}: prompt has a stray brace ({exc}); write {{{{ for a "
                         "literal {") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() and not field.replace("-", "_").isidentifier():
            raise UsageError(f"{where}: placeholder {{{field}}} is not a field name")
        if spec or conversion:
            written = field + (f"!{conversion}" if conversion else "") + (
                f":{spec}" if spec else "")
            raise UsageError(f"{where}: placeholder {{{written}}} has a format spec or "
                             f"conversion; only {{{field}}} is filled in (write {{{{ for a "
                             "literal brace)")


def _text(entry: dict, key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UsageError(f"{where}: {key} must be a non-empty text")
    return value


def _number(entry: dict, key: str, where: str, kind: type, low: float):
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or (kind is int and not float(value).is_integer()) or \
            not value >= low:
        noun = "an integer" if kind is int else "a number"
        raise UsageError(f"{where}: {key} must be {noun} >= {low:g}, got {value!r}")
    return kind(value)


def _response_format(entry: dict, name: str, where: str) -> dict | None:
    """OpenAI's response_format for this prompt (``schema`` is short for a json_schema one),
    its JSON schema checked."""
    if "schema" in entry and "response_format" in entry:
        raise UsageError(f"{where}: give schema or response_format, not both")
    if "schema" in entry:
        schema_name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64]
        entry = {"response_format": {"type": "json_schema", "json_schema": {
            "name": schema_name, "schema": entry["schema"], "strict": False}}}
    response_format = entry.get("response_format")
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in RESPONSE_TYPES:
        raise UsageError(f"{where}: response_format.type must be one of "
                         f"{', '.join(RESPONSE_TYPES)}")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise UsageError(f"{where}: a json_schema response_format needs json_schema.schema "
                             "(an object)")
        from beam_caption.core.structured import check_schema

        problem = check_schema(spec["schema"])
        if problem:
            raise UsageError(f"{where}: {problem}")
    return response_format

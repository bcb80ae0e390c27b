"""A user's schema and prompts file, hostile or careless (issue 22): nothing they hold may hang a
worker, reach the network, exhaust memory or fail every record; what can be known at launch is
refused there, in one line naming the prompt."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import TEST_RUNNER, run_cli

from beam_caption.core.errors import CaptionError, UsageError
from beam_caption.core.prompts import (
    MAX_FILE_BYTES,
    MAX_PROMPT_CHARS,
    load_prompts_file,
    parse_prompts,
)
from beam_caption.core.structured import answer_checker, check_schema
from beam_caption.testing import FakeVLMServer

CATASTROPHIC = "^([^!]+)+!$"  # Python's re backtracks 2**n times on n characters without a "!"
PATTERN_SCHEMA = {"type": "object", "properties": {"text": {"type": "string",
                                                           "pattern": CATASTROPHIC}}}


def run_bounded(code: str, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter under a 2 GiB address space and ``timeout``; the
    JSON it printed last. A regression that hangs (a regex holding the GIL) or eats memory fails
    this test instead of the suite."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    process = subprocess.run([sys.executable, "-c", limit + textwrap.dedent(code)],
                             capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stderr[-2000:]
    return json.loads(process.stdout.splitlines()[-1])


# --- a schema pattern with catastrophic backtracking ------------------------------------------

def test_a_catastrophic_pattern_is_checked_in_milliseconds_and_fails_as_a_schema_error():
    result = run_bounded(f"""
        import json, time
        from beam_caption.core.errors import CaptionError
        from beam_caption.core.structured import answer_checker
        check = answer_checker(True, {PATTERN_SCHEMA!r})
        seconds = {{}}
        for size in (47, 32_000):  # the fake's caption; --max_caption_chars' default
            started = time.perf_counter()
            try:
                check(json.dumps({{"text": "a" * size}}))
            except CaptionError as error:
                seconds[size] = [time.perf_counter() - started, error.stage, error.type,
                                 error.retryable]
        print(json.dumps(seconds))
    """)
    for size, (seconds, stage, kind, retryable) in result.items():
        assert (stage, kind, retryable) == ("response", "schema", True), size
        assert seconds < 0.1, (size, seconds)


def test_a_record_whose_answer_fails_a_catastrophic_pattern_fails_typed_after_its_retries(
        dataset_factory, tmp_path):
    """A real worker: its event loop checks the answers; the run must end, each record a
    response/schema failure after --max_retries (the process is killed at the timeout)."""
    data = dataset_factory(2, files=1)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"caption": {"prompt": "Describe it."},
                                   "tags": {"prompt": "Tag it.", "schema": PATTERN_SCHEMA}}))
    with FakeVLMServer() as server:
        started = time.monotonic()
        result = run_cli([*TEST_RUNNER, "--input", data.manifests[0], "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--prompts_file", str(prompts), "--max_retries", "1",
                          "--max_backoff", "0.01", "--no_progress"], tmp_path / "out",
                         timeout=120)
        took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.failures) == 2 and not result.captions
    for failure in result.failures:
        error = failure["error"]
        assert (error["stage"], error["type"], error["prompt"], error["attempts"]) == (
            "response", "schema", "tags", 2)
        assert CATASTROPHIC in error["message"]
        assert failure["answers"]["caption"] == data.expected[failure["record"]["id"]]
    assert took < 100


@pytest.mark.parametrize("pattern, why", [
    (r"^(a)\1$", "invalid escape sequence: \\1"),  # a backreference
    ("^(?=x)", "invalid perl operator: (?="),  # lookahead
    ("a++", "bad repetition operator: ++"),  # possessive
    (r"x\Z", "invalid escape sequence: \\Z"),
])
def test_a_pattern_re2_cannot_match_is_refused_at_launch_naming_prompt_and_pattern(pattern,
                                                                                   why):
    for schema in ({"type": "string", "pattern": pattern},
                   {"type": "object", "patternProperties": {pattern: {"type": "string"}}},
                   {"type": "object", "properties": {"a": {"$ref": "#/$defs/p"}},
                    "$defs": {"p": {"pattern": pattern}}}):
        with pytest.raises(UsageError) as refused:
            parse_prompts({"tags": {"prompt": "x", "schema": schema}}, "--prompts_file p.yaml")
        message = str(refused.value)
        assert message.startswith("--prompts_file p.yaml: prompt 'tags': pattern ")
        assert repr(pattern) in message and why in message and "RE2" in message
        assert "\n" not in message


def test_patterns_are_matched_with_re2_everywhere_jsonschema_matches_them():
    schema = {"type": "object", "properties": {"id": {"type": "string"}},
              "patternProperties": {"^x-[a-z]+$": {"type": "integer"}},
              "additionalProperties": False,
              "propertyNames": {"pattern": "^[a-z-]+$"}}
    assert check_schema(schema) is None
    check = answer_checker(True, schema)
    assert check('{"id": "a", "x-one": 1}') == {"id": "a", "x-one": 1}
    with pytest.raises(CaptionError, match="does not match"):  # not a UnicodeEncodeError
        check('{"x-\\udc00": 1}')  # a lone surrogate, which UTF-8 (and RE2) cannot hold
    for answer, where in (('{"x-one": "1"}', "at x-one"), ('{"y": 1}', "'y' does not match any"),
                          ('{"Id": "a"}', "the top")):
        with pytest.raises(CaptionError, match=where) as failed:
            check(answer)
        assert (failed.value.stage, failed.value.type) == ("response", "schema")
    # jsonschema would match these with Python's re inside unevaluatedProperties: refused
    assert "unevaluatedProperties with patternProperties" in check_schema(
        {"patternProperties": {"^a": {}}, "unevaluatedProperties": False})


def test_unique_items_is_linear_and_keeps_json_equality():
    check = answer_checker(True, {"type": "array", "uniqueItems": True})
    answer = json.dumps([{"n": i} for i in range(3000)])  # quadratic in jsonschema: ~10 s
    started = time.perf_counter()
    assert len(check(answer)) == 3000
    assert time.perf_counter() - started < 0.5
    assert check('[1, true, "1", [1], {"1": 1}, null, 0, false]')  # all distinct in JSON
    for same in ('[1, 1.0]', '[{"a": [1]}, {"a": [1.0]}]', '["x", "x"]'):
        with pytest.raises(CaptionError, match="non-unique"):
            check(same)


def test_a_schema_whose_check_explodes_stops_at_the_check_limit():
    """anyOf of two $refs at each level: 2**depth evaluations, whatever the regex engine."""
    result = run_bounded("""
        import json, time
        from beam_caption.core.errors import CaptionError
        from beam_caption.core.structured import MAX_CHECK_SECONDS, answer_checker
        branch = {"type": "array", "items": {"$ref": "#/$defs/n"}}
        check = answer_checker(True, {"$defs": {"n": {"anyOf": [branch, dict(branch)]}},
                                      "$ref": "#/$defs/n"})
        started = time.perf_counter()
        try:
            check("[" * 40 + "1" + "]" * 40)
        except CaptionError as error:
            print(json.dumps([time.perf_counter() - started, MAX_CHECK_SECONDS, error.stage,
                              error.type, error.retryable]))
    """)
    seconds, limit, *error = result
    assert error == ["response", "schema_check_limit", False]
    assert limit <= seconds < limit + 1


def test_an_answer_over_the_checked_size_is_not_parsed():
    check = answer_checker(True, {"type": "array"})
    with pytest.raises(CaptionError) as failed:
        check("[" + "1," * 600_000 + "1]")
    assert (failed.value.type, failed.value.retryable) == ("schema_check_limit", False)


# --- $ref to a remote URL ---------------------------------------------------------------------

@pytest.fixture
def counting_server():
    """A loopback HTTP server answering every GET with a schema, counting them."""
    gets = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/schema+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", gets
    server.shutdown()
    server.server_close()


def test_a_remote_ref_is_refused_at_launch_and_never_fetched(counting_server, tmp_path):
    url, gets = counting_server
    remote = {"type": "object", "properties": {"a": {"$ref": f"{url}/a.json"}}}
    path = tmp_path / "prompts.yaml"
    path.write_text(json.dumps({"prompts": {"tags": {"prompt": "x", "schema": remote}}}))
    with pytest.raises(UsageError) as refused:
        load_prompts_file(str(path))
    message = str(refused.value)
    assert message.startswith(f"--prompts_file {path}: prompt 'tags': $ref '{url}/a.json' ")
    assert "does not point into the schema" in message and "\n" not in message
    for other in ("other.json", "#/$defs/missing", f"{url}/s.json#/$defs/a"):
        assert "does not point into the schema" in check_schema({"$ref": other})
    # even a checker built past the launch check fetches nothing: the record fails, typed
    check = answer_checker(True, remote)
    with pytest.raises(CaptionError) as failed:
        check('{"a": "x"}')
    assert (failed.value.stage, failed.value.type) == ("response", "schema_check_limit")
    assert gets == []


def test_local_refs_still_work():
    schemas = [
        {"$defs": {"word": {"type": "string", "maxLength": 5}},
         "type": "array", "items": {"$ref": "#/$defs/word"}},
        {"$id": "https://example.com/tags", "type": "array",
         "items": {"$ref": "word"}, "$defs": {"word": {"$id": "word", "type": "string",
                                                       "maxLength": 5}}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
         "definitions": {"word": {"type": "string", "maxLength": 5}},
         "items": {"$ref": "#/definitions/word"}},
        {"$defs": {"word": {"$anchor": "word", "type": "string", "maxLength": 5}},
         "type": "array", "items": {"$ref": "#word"}},
    ]
    for schema in schemas:
        (spec,) = parse_prompts({"tags": {"prompt": "x", "schema": schema}})
        check = answer_checker(True, spec.schema)
        assert check('["cat", "dog"]') == ["cat", "dog"]
        with pytest.raises(CaptionError, match="is too long"):
            check('["elephant"]')
    # a metaschema is known without fetching it
    assert check_schema({"$ref": "https://json-schema.org/draft/2020-12/schema"}) is None


# --- a prompts file that would exhaust memory -------------------------------------------------

def alias_bomb() -> str:
    """Nine levels of nine aliases under a schema's $defs: 9**9 schemas once expanded."""
    levels = "".join(f"\n    l{i}: &l{i} {{allOf: [{', '.join([f'*l{i - 1}'] * 9)}]}}"
                     for i in range(1, 10))
    return ("tags:\n  prompt: Tag it.\n  schema:\n   type: object\n   $defs:\n"
            f"    l0: &l0 {{type: string}}{levels}\n")


def test_a_yaml_alias_bomb_is_refused_at_launch_in_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 700
    result = run_bounded(f"""
        import json, time
        from beam_caption.core.errors import UsageError
        from beam_caption.core.prompts import load_prompts_file
        started = time.perf_counter()
        try:
            load_prompts_file({str(path)!r})
        except UsageError as error:
            print(json.dumps([str(error), time.perf_counter() - started]))
    """)
    message, seconds = result
    assert message == (f"--prompts_file {path}: holds more than 100000 values or 4194304 "
                       "characters (YAML aliases expanded)")
    assert seconds < 1


@pytest.mark.parametrize("name, text, message", [
    ("deep.yaml", "a: " + "[" * 10_000 + "]" * 10_000, "nested deeper than 64 levels"),
    ("deep.json", '{"a": {"prompt": "x", "schema": ' + '{"items": ' * 70 + "{}" + "}" * 70 + "}}",
     "nested deeper than 64 levels"),
    ("chain.yaml", "l0: &l0 [x]\n" + "".join(f"l{i}: &l{i} [*l{i - 1}]\n" for i in range(1, 80)),
     "nested deeper than 64 levels (YAML aliases expanded)"),
    ("self.yaml", "a: &a {prompt: x, schema: {items: *a}}\n", "an alias holds itself"),
    ("long.yaml", "x: &x '" + "y" * 500_000 + "'\nl: [" + ", ".join(["*x"] * 10) + "]\n",
     "4194304 characters (YAML aliases expanded)"),
    ("big.json", json.dumps({"a": {"prompt": "x" * MAX_FILE_BYTES}}),
     f"longer than {MAX_FILE_BYTES} bytes"),
    ("date.yaml", "a: {prompt: x, schema: {enum: [2024-01-01]}}\n", "holds a value JSON cannot"),
])
def test_a_prompts_file_over_its_bounds_is_refused_at_launch_in_one_line(tmp_path, name, text,
                                                                         message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError) as refused:
        load_prompts_file(str(path))
    assert str(refused.value).startswith(f"--prompts_file {path}: ")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_aliases_within_the_bounds_are_still_welcome(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text("caption: {system: &system You describe photos., prompt: Describe it.}\n"
                    "alt: {system: *system, prompt: 'Alt text for {title}.'}\n")
    caption, alt = load_prompts_file(str(path))
    assert caption.system_prompt == alt.system_prompt == "You describe photos."


# --- placeholders ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, shown", [
    ("Tag {id:{x}}.", "{id:{x}}"),  # a nested field: KeyError on every record
    ("Tag {id:>1000000000}.", "{id:>1000000000}"),  # a 1 GB prompt per record
    ("Tag {id!r}.", "{id!r}"),
    ("Tag {id!s:^9}.", "{id!s:^9}"),
])
def test_a_placeholder_with_a_format_spec_or_conversion_is_refused_at_launch(prompt, shown):
    with pytest.raises(UsageError) as refused:
        parse_prompts({"tags": prompt}, "--prompts_file p.yaml")
    assert str(refused.value) == (
        f"--prompts_file p.yaml: prompt 'tags': placeholder {shown} has a format spec or "
        "conversion; only {id} is filled in (write {{ for a literal brace)")


def test_a_prompt_filled_in_over_its_bound_fails_its_record_typed():
    (spec,) = parse_prompts({"tags": "{note} {note} {note} {{literal}}"})
    assert spec.user_text({"note": "n"}) == "n n n {literal}"
    assert spec.user_text({"note": {"k": [1]}}) == '{"k": [1]} {"k": [1]} {"k": [1]} {literal}'
    with pytest.raises(CaptionError) as failed:
        spec.user_text({"note": "x" * (MAX_PROMPT_CHARS // 3)})  # each fits; the three do not
    error = failed.value
    assert (error.stage, error.type, error.retryable) == ("read", "prompt_too_long", False)
    assert f"over {MAX_PROMPT_CHARS}" in error.message and "'tags'" in error.message


# --- schemas that jsonschema takes but cannot use ---------------------------------------------

@pytest.mark.parametrize("dialect", [5, [], "http://example.com/my-draft"])
def test_a_schema_of_an_unknown_draft_is_refused_at_launch(dialect):
    with pytest.raises(UsageError, match=r"prompt 't': \$schema .* is not a JSON Schema draft"):
        parse_prompts({"t": {"prompt": "x", "schema": {"$schema": dialect}}})


def test_a_schema_that_refers_to_itself_fails_the_record_typed_not_the_worker():
    check = answer_checker(True, {"properties": {"a": {"$ref": "#/properties/a"}}})
    with pytest.raises(CaptionError) as failed:
        check('{"a": 1}')
    assert (failed.value.stage, failed.value.type) == ("response", "schema_check_limit")

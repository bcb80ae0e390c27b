import gzip
import json
import os

import apache_beam as beam
import fsspec
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_caption.core.errors import UsageError
from beam_caption.core.manifest_reader import iter_manifest, match_manifests, record_key
from beam_caption.transforms.manifests import ReadManifestFiles

RECORDS = [{"image": [f"img{i}.png"], "conversation": [{"from": "human", "value": f"q{i}"}]}
           for i in range(5)]

READER = "beam_caption.core.manifest_reader."  # its chunk sizes and limits are patched


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_records_get_file_and_index_keys(tmp_path):
    file = write_jsonl(tmp_path / "m.jsonl", RECORDS)
    elements = list(iter_manifest(file))
    assert [e["record"] for e in elements] == RECORDS
    assert [e["key"] for e in elements] == [f"{file}#{i}" for i in range(5)]
    assert elements[3]["source"] == {"file": file, "index": 3}


def test_json_array_is_streamed_item_by_item(tmp_path, monkeypatch):
    monkeypatch.setattr(READER + "_CHUNK_CHARS", 7)  # force many refills
    path = tmp_path / "m.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    elements = list(iter_manifest(str(path)))
    assert [e["record"] for e in elements] == RECORDS
    assert [e["source"]["index"] for e in elements] == list(range(5))


def test_json_array_with_strings_containing_brackets(tmp_path):
    records = [{"image": "a]b,[c.png", "note": "} ] ,"}, {"image": "x.png"}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(records))
    assert [e["record"] for e in iter_manifest(str(path))] == records


def test_empty_array_and_empty_file_give_nothing(tmp_path):
    (tmp_path / "a.json").write_text(" [ ] \n")
    (tmp_path / "b.jsonl").write_text("\n\n")
    assert list(iter_manifest(str(tmp_path / "a.json"))) == []
    assert list(iter_manifest(str(tmp_path / "b.jsonl"))) == []


def test_gzip_jsonl_and_gzip_array(tmp_path):
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    with gzip.open(tmp_path / "m.json.gz", "wt") as f:
        f.write(json.dumps(RECORDS))
    for name in ("m.jsonl.gz", "m.json.gz"):
        assert [e["record"] for e in iter_manifest(str(tmp_path / name))] == RECORDS


def test_malformed_line_is_a_failure_with_line_number_and_raw_text(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n" + json.dumps(RECORDS[1]) + "\n")
    elements = list(iter_manifest(str(path)))
    assert [e.get("record") for e in elements] == [RECORDS[0], None, RECORDS[1]]
    bad = elements[1]
    assert bad["raw"] == "{not json"
    assert bad["error"]["stage"] == "read" and bad["error"]["type"] == "malformed_json"
    assert "line 2" in bad["error"]["message"]
    assert bad["key"] == record_key(str(path), 1)


def test_record_that_is_not_an_object_is_a_failure(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('[1, 2]\n"text"\n')
    types = [e["error"]["type"] for e in iter_manifest(str(path))]
    assert types == ["record_not_object", "record_not_object"]


def test_truncated_array_keeps_items_before_the_break(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(RECORDS)[:-40])
    elements = list(iter_manifest(str(path)))
    good = [e for e in elements if "record" in e]
    bad = [e for e in elements if "error" in e]
    assert [e["record"] for e in good] == RECORDS[:len(good)] and len(good) >= 3
    assert len(bad) == 1 and bad[0]["error"]["type"] == "malformed_json"
    assert bad[0]["source"]["index"] == len(good)


def test_invalid_utf8_reports_where_reading_stopped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n\xff\xfe{bad}\n"
                     + json.dumps(RECORDS[1]).encode() + b"\n")
    elements = list(iter_manifest(str(path)))
    assert elements[0]["record"] == RECORDS[0] and elements[2]["record"] == RECORDS[1]
    error = elements[1]["error"]
    assert error["type"] == "bad_utf8" and "line 2" in error["message"]


def test_corrupt_gzip_reports_where_reading_stopped(tmp_path):
    data = gzip.compress(("".join(json.dumps(r) + "\n" for r in RECORDS * 2000)).encode())
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(data[:len(data) // 2])
    elements = list(iter_manifest(str(path)))
    assert "record" in elements[0]
    last = elements[-1]
    assert last["error"]["type"] == "manifest_unreadable"
    assert last["source"]["index"] == len(elements) - 1


def test_keys_are_stable_and_parse_back(tmp_path):
    file = write_jsonl(tmp_path / "m#1.jsonl", RECORDS)
    first = [e["key"] for e in iter_manifest(file)]
    assert first == [e["key"] for e in iter_manifest(file)]
    assert first[2] == f"{file}#2"  # the file name may hold '#' itself


def test_match_globs_lists_and_reports_no_match(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    write_jsonl(tmp_path / "b.jsonl", RECORDS)
    (tmp_path / "sub.jsonl").mkdir()
    files = match_manifests([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")])
    assert files == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(UsageError, match="nothing.jsonl"):
        match_manifests([str(tmp_path / "nothing.jsonl")])


def test_relative_manifest_paths_become_absolute(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    monkeypatch.chdir(tmp_path)
    assert match_manifests(["a.jsonl"]) == [os.path.join(str(tmp_path), "a.jsonl")]


def test_memory_filesystem_urls(tmp_path):
    with fsspec.open("memory://bucket/m.jsonl", "w") as f:
        f.write(json.dumps(RECORDS[0]) + "\n")
    files = match_manifests(["memory://bucket/*.jsonl"])
    assert files == ["memory:///bucket/m.jsonl"]
    assert next(iter_manifest(files[0]))["record"] == RECORDS[0]


def test_read_manifests_transform(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps(RECORDS[3]) + "\nnope\n")
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | ReadManifestFiles([a, str(b)])
        assert_that(out["records"] | beam.Map(lambda e: e["key"]),
                    equal_to([f"{a}#{i}" for i in range(3)] + [f"{b}#0"]), label="records")
        assert_that(out["failures"] | beam.Map(lambda e: (e["key"], e["raw"])),
                    equal_to([(f"{b}#1", "nope")]), label="failures")


def elements_of(path) -> tuple[list[dict], list[dict]]:
    elements = list(iter_manifest(str(path)))
    for element in elements:  # everything emitted can be encoded
        json.dumps(element, ensure_ascii=False).encode("utf-8")
    return ([e for e in elements if "record" in e], [e for e in elements if "error" in e])


def nested(depth: int) -> str:
    return '{"image": "a.png", "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("bad_line, error_type", [
    (nested(1200), "too_deep"),  # RecursionError in json
    (nested(150), "too_deep"),  # parses, but deeper than later stages may recurse
    ('{"image": "a.png", "n": ' + "9" * 5000 + "}", "malformed_json"),  # int over 4,300 digits
    ('{"image": "a\\ud800.png"}', "lone_surrogate"),
    ('{"image": "a.png", "\\udfff": 1}', "lone_surrogate"),
    ('{"image": "a.png", "score": NaN}', "malformed_json"),
    ('{"image": "a.png", "score": -Infinity}', "malformed_json"),
    ('{"image": "a.png", "score": 1e400}', "malformed_json"),  # a float overflowing to inf
])
@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_one_hostile_value_is_one_failure_and_reading_goes_on(tmp_path, bad_line, error_type,
                                                              layout):
    lines = [json.dumps(RECORDS[0]), bad_line, json.dumps(RECORDS[1])]
    if layout == "jsonl":
        path = tmp_path / "m.jsonl"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = tmp_path / "m.json"
        path.write_text("[\n" + ",\n".join(lines) + "\n]")
    good, bad = elements_of(path)
    assert [e["record"] for e in good] == RECORDS[:2]
    assert [(e["source"]["index"], e["error"]["type"]) for e in bad] == [(1, error_type)]
    assert bad[0]["raw"] and bad[0]["error"]["message"]


def test_a_bad_array_item_costs_that_item_only(tmp_path):
    items = [json.dumps({"id": i, "image": f"{i}.png"}) for i in range(500)]
    items[3] = "{'id': 3, 'image': 'a], {b.png'}"  # single quotes, brackets inside
    path = tmp_path / "m.json"
    path.write_text("[" + ",\n ".join(items) + "]")
    good, bad = elements_of(path)
    assert [e["record"]["id"] for e in good] == [i for i in range(500) if i != 3]
    assert [e["source"]["index"] for e in good] == [i for i in range(500) if i != 3]
    assert len(bad) == 1 and bad[0]["source"]["index"] == 3
    assert bad[0]["raw"] == items[3] and "item 3" in bad[0]["error"]["message"]


def test_a_bad_item_at_a_chunk_boundary_is_found_by_reading_on(tmp_path, monkeypatch):
    monkeypatch.setattr(READER + "_CHUNK_CHARS", 5)
    items = [json.dumps(r) for r in RECORDS]
    items[2] = "{'broken': [1, 2, {'x': '}'}]}"
    path = tmp_path / "m.json"
    path.write_text("[" + ", ".join(items) + "]")
    good, bad = elements_of(path)
    assert [e["record"] for e in good] == [r for i, r in enumerate(RECORDS) if i != 2]
    assert [e["source"]["index"] for e in bad] == [2]


def test_a_trailing_comma_is_accepted(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(RECORDS)[:-1] + ",\n]")
    good, bad = elements_of(path)
    assert [e["record"] for e in good] == RECORDS and bad == []


@pytest.mark.parametrize("newline", ["\r", "\r\n", "\n"])
def test_every_line_ending_separates_records(tmp_path, monkeypatch, newline):
    monkeypatch.setattr(READER + "_CHUNK_BYTES", 7)  # "\r\n" split across reads
    path = tmp_path / "m.jsonl"
    path.write_bytes(newline.join(json.dumps(r) for r in RECORDS).encode() + newline.encode())
    good, bad = elements_of(path)
    assert [e["record"] for e in good] == RECORDS and bad == []
    assert [e["source"]["index"] for e in good] == list(range(5))


def test_a_file_that_is_not_a_zip_is_one_failure(tmp_path):
    path = tmp_path / "m.jsonl.zip"
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    good, bad = elements_of(path)
    assert good == [] and len(bad) == 1
    assert bad[0]["error"]["type"] == "manifest_unreadable"
    assert "BadZipFile" in bad[0]["error"]["message"]


def write_array(path, items: list[str], separator=",\n ") -> str:
    path.write_text("[" + separator.join(items) + "]")
    return str(path)


ITEMS = [json.dumps({"id": i, "image": f"{i}.png"}) for i in range(300)]


@pytest.mark.parametrize("max_size", [None, 1000])
def test_a_stray_apostrophe_in_a_broken_item_costs_that_item_only(tmp_path, monkeypatch,
                                                                  max_size):
    if max_size:  # the rest of the file is longer than the limit: found again all the same
        monkeypatch.setattr(READER + "MAX_RECORD_SIZE", max_size, raising=False)
    items = ITEMS.copy()
    items[1] = "{'id': 1, 'image': it's.png}"
    good, bad = elements_of(write_array(tmp_path / "m.json", items))
    assert [e["source"]["index"] for e in good] == [i for i in range(300) if i != 1]
    assert [(e["source"]["index"], e["raw"]) for e in bad] == [(1, items[1])]


@pytest.mark.parametrize("first, raw", [
    (f"{ITEMS[0]} {ITEMS[1]}", ITEMS[1]),  # no comma between two items
    (f"{ITEMS[0]} x", "x"),
    (ITEMS[0] + "}", "}"),
])
def test_a_missing_comma_or_stray_text_costs_one_item(tmp_path, first, raw):
    good, bad = elements_of(write_array(tmp_path / "m.json", [first, *ITEMS[2:5]]))
    assert [(e["source"]["index"], e["raw"], e["error"]["type"]) for e in bad] == [
        (1, raw, "malformed_json")]
    assert "item 1" in bad[0]["error"]["message"]
    assert [e["record"]["id"] for e in good] == [e["source"]["index"] for e in good] == [0, 2, 3, 4]


@pytest.mark.parametrize("chunk", [3, 4, 1000])
def test_items_cut_by_a_chunk_end_are_read_whole(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(READER + "_CHUNK_CHARS", chunk)
    path = tmp_path / "m.json"
    path.write_text('[123456, {"a": 1}, {"b": 2}\n')  # a number, and no closing ']'
    good, bad = elements_of(path)
    assert [(e["source"]["index"], e["raw"], e["error"]["type"]) for e in bad] == [
        (0, "123456", "record_not_object"), (3, "", "malformed_json")]
    assert [e["record"] for e in good] == [{"a": 1}, {"b": 2}]


def test_bad_utf8_in_an_array_costs_that_item_only(tmp_path):
    path = tmp_path / "m.json"
    path.write_bytes(b"[" + ITEMS[0].encode() + b', {"image": "\xff.png"},\n'
                     + ITEMS[2].encode() + b"]")
    good, bad = elements_of(path)
    assert [e["source"]["index"] for e in good] == [0, 2]
    assert [(e["source"]["index"], e["error"]["type"]) for e in bad] == [(1, "bad_utf8")]
    assert bad[0]["raw"] == '{"image": "\ufffd.png"}'


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_an_overlong_record_is_one_failure_and_is_not_held(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(READER + "MAX_RECORD_SIZE", 1000, raising=False)
    monkeypatch.setattr(READER + "_CHUNK_BYTES", 64)
    monkeypatch.setattr(READER + "_CHUNK_CHARS", 64)
    long = json.dumps({"image": "a.png", "note": "x" * 5000})
    lines = [ITEMS[0], long, ITEMS[2], long]
    if layout == "jsonl":
        path = tmp_path / "m.jsonl"
        path.write_text("\r".join(lines))
    else:
        path = write_array(tmp_path / "m.json", lines)
    good, bad = elements_of(path)
    assert [e["source"]["index"] for e in good] == [0, 2]
    assert [(e["source"]["index"], e["error"]["type"]) for e in bad] == [
        (1, "record_too_large"), (3, "record_too_large")]
    assert long.startswith(bad[0]["raw"]) and 1000 <= len(bad[0]["raw"]) < len(long)


def test_a_manifest_name_that_is_not_utf8_fails_the_launch(tmp_path):
    (tmp_path / "ok.jsonl").write_text(ITEMS[0] + "\n")
    with open(os.fsencode(tmp_path) + b"/\xff.jsonl", "wb") as handle:
        handle.write(ITEMS[0].encode() + b"\n")
    with pytest.raises(UsageError, match="not valid UTF-8") as raised:
        match_manifests([str(tmp_path / "*.jsonl")])
    str(raised.value).encode("utf-8")


def test_any_error_opening_a_manifest_is_one_one_line_failure(tmp_path, monkeypatch):
    def broken_open(*args, **kwargs):
        raise RuntimeError("storage said no\nsecond line")
    monkeypatch.setattr(fsspec, "open", broken_open)
    good, bad = elements_of(tmp_path / "m.jsonl")
    assert good == [] and [e["error"]["type"] for e in bad] == ["manifest_unreadable"]
    assert bad[0]["error"]["message"].endswith("RuntimeError: storage said no second line")

"""Parquet tables (core/parquet_rows.py): rows as records, image bytes beside them, every
column in a lossless JSON form, each bad image value a typed failure of its row."""

import base64
import datetime
import decimal
import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_caption.core.errors import UsageError
from beam_caption.core.parquet_rows import check_image_column, iter_rows, json_value, row_groups

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image()


def jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (i * 40 % 256, 90, 200)).save(out, "JPEG")
    return out.getvalue()


def write_table(path, columns: dict, **options) -> str:
    pq.write_table(pa.table(columns), str(path), **options)
    return str(path)


def read_all(file: str, image_key: str) -> list[dict]:
    return [element for group in row_groups(file)
            for element in iter_rows(file, group[1], group[2], image_key)]


def errors(elements) -> list:
    return [element["error"]["type"] if "error" in element else None for element in elements]


def test_a_hugging_face_table_gives_image_bytes_beside_the_record(tmp_path):
    file = write_table(tmp_path / "train-00000-of-00001.parquet", {
        "image": pa.array([{"bytes": jpeg(0), "path": "0.jpg"}, {"bytes": jpeg(1), "path": None},
                           {"bytes": None, "path": "images/2.jpg"},
                           {"bytes": None, "path": None}], HF_IMAGE),
        "text": ["a cat", "a dog", "a cow", "nothing"]})
    elements = read_all(file, "image")
    assert elements[0] == {"key": f"{file}#0", "source": {"file": file, "index": 0},
                           "record": {"image": "0.jpg", "text": "a cat"}, "images": [jpeg(0)]}
    assert elements[1]["record"] == {"image": None, "text": "a dog"}  # bytes without a path
    assert elements[1]["images"] == [jpeg(1)]
    assert elements[2] == {"key": f"{file}#2", "source": {"file": file, "index": 2},
                           "record": {"image": "images/2.jpg", "text": "a cow"}}  # a path
    assert errors(elements) == [None, None, None, "no_image_in_struct"]
    assert elements[3]["record"] == {"image": None, "text": "nothing"}
    assert "neither bytes nor a path" in elements[3]["error"]["message"]
    check_image_column(file, "image")


def test_path_list_and_bytes_columns(tmp_path):
    file = write_table(tmp_path / "t.parquet", {
        "url": ["https://example.com/a.jpg", "b/c.png"],
        "urls": [["a.jpg", "b.jpg"], []],
        "raw": pa.array([jpeg(0), jpeg(1)], pa.binary()),
        "many": pa.array([[{"bytes": jpeg(2), "path": "x.jpg"}, {"bytes": jpeg(3), "path": None}],
                          [{"bytes": jpeg(4), "path": None}, {"bytes": None, "path": "p.jpg"}]],
                         pa.list_(HF_IMAGE))})
    by_url = read_all(file, "url")
    assert [e["record"]["url"] for e in by_url] == ["https://example.com/a.jpg", "b/c.png"]
    assert all("images" not in e for e in by_url)
    assert by_url[0]["record"]["raw"] == {"$base64": base64.b64encode(jpeg(0)).decode()}
    assert [e["record"]["urls"] for e in read_all(file, "urls")] == [["a.jpg", "b.jpg"], []]
    by_raw = read_all(file, "raw")
    assert [(e["images"], e["record"]["raw"]) for e in by_raw] == [([jpeg(0)], None),
                                                                   ([jpeg(1)], None)]
    by_list = read_all(file, "many")
    assert by_list[0]["images"] == [jpeg(2), jpeg(3)]
    assert by_list[0]["record"]["many"] == ["x.jpg", None]
    assert errors(by_list) == [None, "mixed_image_list"]
    for key in ("url", "urls", "raw", "many"):
        check_image_column(file, key)


def test_image_bytes_never_reach_a_record(tmp_path):
    file = write_table(tmp_path / "t.parquet", {
        "image": pa.array([{"bytes": jpeg(0), "path": "a.jpg"}, None,
                           {"bytes": jpeg(1), "path": None}], HF_IMAGE)})
    marker = base64.b64encode(jpeg(0)[:30]).decode()[:20]
    for element in read_all(file, "image"):
        line = json.dumps({k: v for k, v in element.items() if k != "images"})
        assert marker not in line and "$base64" not in line


def test_a_column_that_holds_no_image_is_refused_at_launch_and_fails_each_row(tmp_path):
    file = write_table(tmp_path / "t.parquet", {"a": [1, 2], "b": [True, False],
                                                "c": ["x.jpg", None]})
    with pytest.raises(UsageError) as missing:
        check_image_column(file, "image")
    assert str(missing.value) == f"--image_key image: {file} has no such column (columns: a, b, c)"
    with pytest.raises(UsageError, match="--image_key a: .* is int64, which holds no image"):
        check_image_column(file, "a")
    with pytest.raises(UsageError, match="is bool"):
        check_image_column(file, "b")
    numbers = read_all(file, "a")
    assert errors(numbers) == ["bad_image_value", "bad_image_value"]
    assert numbers[0]["record"] == {"a": None, "b": True, "c": "x.jpg"}
    assert "holds a int (1)" in numbers[0]["error"]["message"]
    assert errors(read_all(file, "image")) == ["missing_image_key"] * 2
    assert errors(read_all(file, "c")) == [None, "no_image"]  # a null path fails its row only


def test_row_groups_come_from_the_footer_and_keys_count_the_file_rows(tmp_path):
    file = write_table(tmp_path / "t.parquet", {"u": [f"{i}.jpg" for i in range(7)]},
                       row_group_size=3)
    assert row_groups(file) == [(file, 0, 0, 3), (file, 1, 3, 3), (file, 2, 6, 1)]
    assert [e["key"] for e in iter_rows(file, 1, 3, "u")] == [f"{file}#{i}" for i in (3, 4, 5)]
    assert [e["record"]["u"] for e in read_all(file, "u")] == [f"{i}.jpg" for i in range(7)]


def test_a_file_that_is_not_parquet_is_refused(tmp_path):
    (tmp_path / "t.parquet").write_text('{"image": "a.jpg"}\n')
    with pytest.raises(UsageError, match="is not a readable Parquet file"):
        row_groups(str(tmp_path / "t.parquet"))
    with pytest.raises(UsageError, match="is not a readable Parquet file"):
        check_image_column(str(tmp_path / "t.parquet"), "image")


def test_an_unreadable_row_group_fails_its_rows_only(tmp_path):
    file = write_table(tmp_path / "t.parquet", {"u": [f"{i}.jpg" for i in range(6)]},
                       row_group_size=3, compression="snappy", use_dictionary=False)
    chunk = pq.ParquetFile(file).metadata.row_group(0).column(0)
    data = bytearray(open(file, "rb").read())
    start = chunk.data_page_offset
    data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    open(file, "wb").write(data)
    elements = read_all(file, "u")
    assert errors(elements) == ["parquet_unreadable"] * 3 + [None] * 3
    assert [e["key"] for e in elements] == [f"{file}#{i}" for i in range(6)]
    assert "row group 0" in elements[0]["error"]["message"]


def test_a_table_on_any_fsspec_storage(tmp_path):
    with fsspec.open("memory://bucket/t.parquet", "wb") as out:
        pq.write_table(pa.table({"image": pa.array([jpeg(0)], pa.binary()), "n": [1]}), out)
    [element] = read_all("memory://bucket/t.parquet", "image")
    assert element["key"] == "memory://bucket/t.parquet#0"
    assert element["images"] == [jpeg(0)]


TYPED = {  # column: (arrow array, expected JSON form of each value)
    "f": (pa.array([1.5, float("nan"), float("inf"), float("-inf"), None]),
          [1.5, "NaN", "Infinity", "-Infinity", None]),
    "bin": (pa.array([b"\x00\xff", b"", None, b"a", b"b"]),
            [{"$base64": "AP8="}, {"$base64": ""}, None, {"$base64": "YQ=="},
             {"$base64": "Yg=="}]),
    "dec": (pa.array([decimal.Decimal(v) for v in ("12.30", "-0.01", "0", "1", "99999.99")],
                     pa.decimal128(7, 2)),
            ["12.30", "-0.01", "0.00", "1.00", "99999.99"]),
    "ts_us": (pa.array([0, 1_500_000, -1, 86_400_000_000, None], pa.timestamp("us")),
              ["1970-01-01T00:00:00", "1970-01-01T00:00:01.500000",
               "1969-12-31T23:59:59.999999", "1970-01-02T00:00:00", None]),
    "ts_ns_tz": (pa.array([0, 1, 1_000, 1_700_000_000_123_456_789, None],
                          pa.timestamp("ns", tz="Europe/Paris")),
                 ["1970-01-01T01:00:00+01:00", "1970-01-01T01:00:00.000000001+01:00",
                  "1970-01-01T01:00:00.000001+01:00", "2023-11-14T23:13:20.123456789+01:00",
                  None]),
    "ts_ms_offset": (pa.array([0, 1, 2, 3, 4], pa.timestamp("ms", tz="+05:30")),
                     ["1970-01-01T05:30:00+05:30", "1970-01-01T05:30:00.001000+05:30",
                      "1970-01-01T05:30:00.002000+05:30", "1970-01-01T05:30:00.003000+05:30",
                      "1970-01-01T05:30:00.004000+05:30"]),
    "date": (pa.array([0, 19_000, None, -1, 1], pa.date32()),
             ["1970-01-01", "2022-01-08", None, "1969-12-31", "1970-01-02"]),
    "time_ns": (pa.array([0, 1, 45_296_000_000_000, 500_000_000, None], pa.time64("ns")),
                ["00:00:00", "00:00:00.000000001", "12:34:56", "00:00:00.500000", None]),
    "dur": (pa.array([0, -1_500_000, 90_500_000, 1, None], pa.duration("us")),
            ["PT0S", "-PT1.5S", "PT90.5S", "PT0.000001S", None]),
    "dur_ns": (pa.array([1, 2, 3, 4, 10**9], pa.duration("ns")),
               ["PT0.000000001S", "PT0.000000002S", "PT0.000000003S", "PT0.000000004S",
                "PT1S"]),
    "map": (pa.array([[("a", 1)], [], [("b", 2), ("b", 3)], None, [("c", None)]],
                     pa.map_(pa.string(), pa.int64())),
            [{"a": 1}, [], [["b", 2], ["b", 3]], None, {"c": None}]),
    "int_map": (pa.array([[(1, "x")], [], None, [(2, "y")], []], pa.map_(pa.int32(), pa.string())),
                [[[1, "x"]], [], None, [[2, "y"]], []]),
    "nested": (pa.array([{"t": [0, 1]}, None, {"t": None}, {"t": []}, {"t": [None]}],
                        pa.struct([("t", pa.list_(pa.timestamp("ns")))])),
               [{"t": ["1970-01-01T00:00:00", "1970-01-01T00:00:00.000000001"]}, None,
                {"t": None}, {"t": []}, {"t": [None]}]),
}


def test_columns_json_cannot_hold_get_the_documented_lossless_form(tmp_path):
    columns = {"image": [f"{i}.jpg" for i in range(5)]} | {
        name: array for name, (array, _) in TYPED.items()}
    file = write_table(tmp_path / "t.parquet", columns)
    records = [element["record"] for element in read_all(file, "image")]
    for name, (_, expected) in TYPED.items():
        assert [record[name] for record in records] == expected, name
    json.dumps(records, allow_nan=False)  # strict JSON


def test_json_value_round_trips():
    moment = datetime.datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=datetime.UTC)
    values = [b"\x00\x01image", decimal.Decimal("1E+3"), moment, datetime.date(2024, 5, 1),
              datetime.time(12, 0, 0, 250000)]
    text = [json_value(value) for value in values]
    assert base64.b64decode(text[0]["$base64"]) == values[0]
    assert decimal.Decimal(text[1]) == values[1] and text[1] == "1E+3"
    assert datetime.datetime.fromisoformat(text[2]) == moment
    assert datetime.date.fromisoformat(text[3]) == values[3]
    assert datetime.time.fromisoformat(text[4]) == values[4]
    assert json_value({"a": [1, (2, 3, 4)]}) == {"a": [1, [2, 3, 4]]}  # an interval's tuple
    with pytest.raises(TypeError):
        json_value(object())

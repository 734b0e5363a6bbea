"""Readers keep each row's line/row number and turn undecodable rows into errors, not exceptions."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from halokit.data.readers import read_rows, row_unit
from halokit.errors import DataError


def test_jsonl_line_numbers_skip_blank_lines_and_flag_broken_ones(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"a": 2\n[1, 2]\n{"a": "\xff"}\n{"a": 3}\n')
    rows = list(read_rows(p))
    assert [r.position for r in rows] == [1, 3, 4, 5, 6]
    assert rows[0].record == {"a": 1} and rows[-1].record == {"a": 3}
    assert rows[1].error.startswith("invalid JSON") and rows[1].raw == '{"a": 2'
    assert rows[2].error == "expected a JSON object, got list"
    assert rows[3].error == "not valid UTF-8 (byte 0xff at column 8)"
    assert row_unit(p) == "line"


def test_json_list_and_wrapped(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"data": [{"a": 1}, 5]}))
    rows = list(read_rows(p))
    assert rows[0].record == {"a": 1} and rows[1].error == "expected a JSON object, got int"
    assert row_unit(p) == "row"
    p.write_text('[{"a": 1},')
    with pytest.raises(DataError, match=r"d.json: invalid JSON at line 1"):
        list(read_rows(p))


def test_csv_lines_messages_and_bad_bytes(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b'prompt,completion\nhi,"multi\nline"\n"x",[{"role": "assistant"}]\nbad,\xfe\nshort\n')
    rows = list(read_rows(p))
    assert [r.position for r in rows] == [2, 4, 5, 6]
    assert rows[0].record == {"prompt": "hi", "completion": "multi\nline"}
    assert rows[1].record["completion"] == [{"role": "assistant"}]  # JSON lists are chat messages
    assert rows[2].error == "not valid UTF-8" and rows[2].field == "completion"
    assert rows[3].error.startswith("expected 2 columns")


def test_parquet_and_saved_dataset(tmp_path):
    records = [{"prompt": "p", "completion": "c", "label": True},
               {"prompt": [{"role": "user", "content": "hi"}], "completion": "c", "label": False}][:1]
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), p)
    assert [r.record for r in read_rows(p)] == records
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    assert [(r.position, r.record) for r in read_rows(tmp_path / "ds")] == [(1, records[0])]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="no split 'train'; available: test"):
        list(read_rows(tmp_path / "dd"))
    assert len(list(read_rows(tmp_path / "dd", split="test"))) == 1


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        read_rows(tmp_path / "x.txt")
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1garbage")
    with pytest.raises(DataError, match="cannot read Parquet"):
        list(read_rows(bad))


def test_json_that_python_refuses_to_decode_is_a_bad_row_not_a_crash(tmp_path):
    """Regression: 5000-deep nesting raised RecursionError and a 5000-digit number ValueError, uncaught."""
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b'}\n{"a": ' + b"1" * 5000 + b'}\n{"a": 1}\n')
    rows = list(read_rows(p))
    assert [r.error for r in rows] == ["invalid JSON: nested too deeply",
                                      "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion",
                                      None]
    (tmp_path / "d.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(DataError, match="d.json: invalid JSON: nested too deeply"):
        list(read_rows(tmp_path / "d.json"))


def test_bytes_that_are_not_utf8_name_their_field_and_short_csv_rows_their_missing_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "ok", "completion": "\xff"}\n{"\xff": 1}\n')
    assert [r.field for r in read_rows(p)] == ["completion", None]
    c = tmp_path / "d.csv"
    c.write_text("prompt,completion,label\nq,a\n")
    (row,) = read_rows(c)
    assert row.field == "label" and row.error == "expected 3 columns (prompt, completion, label), got 2"


def test_parquet_values_python_cannot_hold_are_bad_rows_naming_the_column(tmp_path):
    """Regression: a timestamp beyond Python's datetime range made to_pylist raise OverflowError."""
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "when": pa.array([2**62, 0], type=pa.timestamp("ms"))}), p)
    rows = list(read_rows(p))
    assert rows[0].field == "when" and rows[0].error.startswith("cannot convert the value to Python")
    assert rows[1].record["prompt"] == "b"

"""Loading under on_bad_row: error names file/line/field; skip keeps good rows and records bad ones."""

import json

import pytest

from halokit.data.load import detect_format, load_examples, write_bad_rows
from halokit.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def feedback_rows(n=10):
    return [{"id": f"r{i}", "prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(n)]


def test_broken_line_7_error_and_skip(tmp_path):
    rows = feedback_rows()
    rows[6] = '{"id": "r6", "prompt": "q6", "completion": "a6", "label": tru'
    p = write_jsonl(tmp_path / "fb.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(p, "feedback")
    assert str(err.value).startswith(f"{p}, line 7: invalid JSON")
    loaded = load_examples(p, "feedback", on_bad_row="skip")
    assert len(loaded.examples) == 9 and [e.id for e in loaded.examples][6] == "r7"
    assert loaded.positions == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    out = write_bad_rows(loaded.bad_rows, tmp_path / "run" / "bad_rows.jsonl")
    recorded = [json.loads(line) for line in out.read_text().splitlines()]
    assert recorded == [{"file": str(p), "field": None, "reason": "invalid JSON: Expecting value at column 59",
                         "raw": rows[6], "line": 7}]


def test_field_errors_count_and_duplicates(tmp_path):
    rows = feedback_rows(6)
    rows[1]["label"] = "maybe"
    rows[3]["completion"] = ""
    rows[5]["id"] = "r0"
    p = write_jsonl(tmp_path / "fb.jsonl", rows)
    with pytest.raises(DataError, match=r"fb.jsonl, line 2, field 'label': unknown label 'maybe'.*"
                                        r"\(and 2 more bad rows\)"):
        load_examples(p, "feedback")
    bad = load_examples(p, "feedback", on_bad_row="skip").bad_rows
    assert [(b.position, b.field) for b in bad] == [(2, "label"), (4, "completion"), (6, "id")]
    assert bad[2].reason == "duplicate id 'r0' (first seen at line 1)"


def test_file_level_errors(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="e.jsonl: no rows"):
        load_examples(empty, "feedback")
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "completion": "b"}] * 3)
    with pytest.raises(DataError, match="no row has the column 'prompt'.*data.columns"):
        load_examples(p, "sft", on_bad_row="skip")
    single = write_jsonl(tmp_path / "one.jsonl", ['{"prompt": 1'])
    with pytest.raises(DataError, match="all 1 rows are bad"):
        load_examples(single, "sft", on_bad_row="skip")


def test_csv_rows_report_line_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion,label\nq1,a1,thumbs_up\nq2,a2,meh\n")
    with pytest.raises(DataError, match=r"d.csv, line 3, field 'label': unknown label 'meh'"):
        load_examples(p, "feedback")


def test_detect_format(tmp_path):
    assert detect_format(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])) \
        == "preference"
    assert detect_format(write_jsonl(tmp_path / "b.jsonl", ['{bad', {"prompt": "p", "completion": "c",
                                                                      "label": 1}])) == "feedback"
    assert detect_format(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"}])) == "sft"
    assert detect_format(write_jsonl(tmp_path / "d.jsonl", [{"q": "p", "a": "c", "thumb": 1}]),
                         columns={"label": "thumb"}) == "feedback"


def test_detect_format_says_why_it_cannot(tmp_path):
    with pytest.raises(DataError, match=r"e.jsonl: no rows$"):
        detect_format(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(DataError, match=r"no row can be read, so its format cannot be detected; the first: "
                                        r".*b.jsonl, line 1: invalid JSON"):
        detect_format(write_jsonl(tmp_path / "b.jsonl", ['{"prompt": "p"', "[1]"]))


def test_bad_rows_file_is_written_whole_or_not_at_all(tmp_path):
    p = write_jsonl(tmp_path / "d.json", [])
    p.write_text('[{"prompt": "caf\\ud800", "completion": "c"}, {"prompt": "p", "completion": "c"}]')
    loaded = load_examples(p, "sft", on_bad_row="skip")
    out = write_bad_rows(loaded.bad_rows, tmp_path / "bad.jsonl")
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["field"] == "prompt" and "lone surrogate U+D800" in row["reason"]  # kept as a \ud800 escape
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"file/bad_rows.jsonl: cannot write the skipped rows \(File exists\)"):
        write_bad_rows(loaded.bad_rows, blocker / "bad_rows.jsonl")

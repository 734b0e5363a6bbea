"""Bad data never crashes halokit: it exits 2 naming file, line/row and field, or skips and records the row.

Two sources of bad files:

* ``tests/data/bad/``: one small file per kind of damage seen in scraped production logs. ``CASES`` lists
  every bad row of each (position -> field). ``halokit data validate`` and ``halokit train`` must refuse
  each file with exit code 2 naming the first bad row; under ``data.on_bad_row=skip`` both must accept the
  good rows, train on them, and write every bad row to ``bad_rows.jsonl``.
* a hypothesis generator: good rows of every format in every container (.jsonl, .json, .csv, .parquet),
  damaged row by row (wrong types, nulls, unknown labels and roles, chosen == rejected, duplicate ids,
  truncated lines, bytes that are not UTF-8, lone surrogates, deep nesting, huge numbers) or as a whole
  (truncated, random bytes, empty). Over 500 files the validation path must raise nothing but DataError.
"""

import contextlib
import csv
import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import halokit.cli
from halokit.cli import main
from halokit.data.examples import FIELDS
from halokit.data.load import load_examples
from halokit.data.tokenize import TokenizeSettings, encode_examples
from halokit.errors import DataError

ROOT = Path(__file__).parents[1]
BAD = Path(__file__).parent / "data" / "bad"


@dataclass(frozen=True)
class Case:
    """A file of ``tests/data/bad`` whose bad rows are known: position -> field (None: the whole row)."""

    file: str
    method: str  # trained with recipes/tiny-<method>.yaml
    bad: dict[int, str | None]
    n_rows: int
    key: str = "data.train"

    @property
    def path(self) -> Path:
        return BAD / self.file

    @property
    def unit(self) -> str:
        return "row" if self.file.endswith((".json", ".parquet")) else "line"

    def where(self, position: int) -> str:
        field = self.bad[position]
        return f"{self.path}, {self.unit} {position}" + (f", field '{field}'" if field else "")


CASES = [
    Case("truncated_lines.jsonl", "kto", {3: None, 6: None}, 6),
    Case("wrong_types.jsonl", "kto", {2: "prompt", 4: "completion[0]", 5: "label", 6: None, 7: "id"}, 9),
    Case("null_empty.jsonl", "kto", {2: "prompt", 3: "completion", 4: "prompt", 5: "completion", 6: "label"}, 9),
    Case("bad_labels.jsonl", "kto", {2: "label", 3: "label", 4: "label", 5: "label", 9: "label"}, 9),
    Case("invalid_utf8.jsonl", "kto", {2: "prompt", 5: "completion"}, 6),
    Case("lone_surrogate.jsonl", "kto", {2: "prompt"}, 5),
    Case("pathological.jsonl", "kto", {2: None, 3: None}, 6),  # 5000-deep nesting, a 5000-digit label
    Case("duplicate_ids.jsonl", "kto", {3: "id", 5: "id"}, 7),
    Case("missing_cell.csv", "kto", {3: "label", 5: "label"}, 6),
    Case("chosen_equals_rejected.jsonl", "dpo", {2: "rejected", 4: "rejected"}, 6),
    Case("unknown_roles.jsonl", "sft", {2: "prompt[0]", 3: "completion[0]", 4: "prompt[1]"}, 7),
    Case("forget_bad_role.jsonl", "npo", {2: "role", 3: "role"}, 5, key="data.forget"),
]
# Refused as a whole: nothing in them can be trained on.
FILE_ERRORS = {
    "empty.jsonl": "empty.jsonl: no rows",
    "truncated.json": "truncated.json: invalid JSON at line 2, column 50: Unterminated string starting",
    "wrong_schema.parquet": "{path}, row 1, field 'completion[0]': expected a message object",  # every row
}


def cli(capsys, *args):
    """``halokit ARGS`` in this process: (exit code, stdout, stderr). An exception would fail the test."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def train_args(case_path, method, run_dir, *extra, key="data.train"):
    return ["train", ROOT / f"recipes/tiny-{method}.yaml", f"{key}={case_path}", "train.max_steps=1",
            "train.micro_batch_size=2", f"output_dir={run_dir}", *extra]


def test_the_corpus_is_what_the_cases_say():
    assert sorted(p.name for p in BAD.iterdir()) == sorted([c.file for c in CASES] + list(FILE_ERRORS) + [
        "long_completion.jsonl", "only_undesirable.jsonl", "no_label_column.csv"])
    schema = pq.read_schema(BAD / "wrong_schema.parquet")
    assert str(schema.field("completion").type) == "list<element: int64>"  # token ids where text belongs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_validate_and_train_refuse_naming_file_line_and_field(case, tmp_path, capsys):
    code, _, err = cli(capsys, "data", "validate", case.path, "--format", _format(case.method))
    assert code == 2
    for position in case.bad:  # every bad row, one line each
        assert case.where(position) + ": " in err
    code, _, err = cli(capsys, *train_args(case.path, case.method, tmp_path / "run", key=case.key))
    assert code == 2 and err.count("\n") == 1
    first = min(case.bad)
    assert f"error: {case.where(first)}: " in err
    assert f"(and {len(case.bad) - 1} more bad rows)" in err or len(case.bad) == 1
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_skip_trains_on_the_good_rows_and_records_every_bad_one(case, tmp_path, capsys):
    expected = {(p, f) for p, f in case.bad.items()}
    listed = tmp_path / "validate_bad_rows.jsonl"
    code, out, _ = cli(capsys, "data", "validate", case.path, "--format", _format(case.method),
                       "data.on_bad_row=skip", "--bad-rows", listed)
    n_good = case.n_rows - len(case.bad)
    assert code == 0 and f"{n_good} valid" in out
    assert _recorded(listed, case) == expected

    run = tmp_path / "run"
    code, out, err = cli(capsys, *train_args(case.path, case.method, run, "data.on_bad_row=skip", key=case.key))
    assert code == 0, err
    split = "forget" if case.key == "data.forget" else "train"
    assert f"{split}: {n_good} examples" in out
    assert _recorded(run / "bad_rows.jsonl", case) == expected
    assert (run / "model" / "model.safetensors").is_file()


def _format(method: str) -> str:
    return {"kto": "feedback", "dpo": "preference", "sft": "sft", "npo": "forget"}[method]


def _recorded(path: Path, case: Case) -> set:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(r["file"] == str(case.path) and r["reason"] for r in rows)
    return {(r[case.unit], r["field"]) for r in rows}


@pytest.mark.parametrize("name", FILE_ERRORS)
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_files_with_nothing_to_train_on_are_refused_whole(name, policy, tmp_path, capsys):
    path = BAD / name
    message = FILE_ERRORS[name].format(path=path)
    for args in (["data", "validate", path, "--format", "feedback", f"data.on_bad_row={policy}"],
                 train_args(path, "kto", tmp_path / "run", f"data.on_bad_row={policy}")):
        code, _, err = cli(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_completion_longer_than_max_length_is_truncated_and_counted(tmp_path, capsys):
    """Not an error: the completion keeps its first max_length - |prompt| tokens, and the run says how many
    rows were cut (one here: 3,400 bytes against data.max_length=128)."""
    path = BAD / "long_completion.jsonl"
    code, out, _ = cli(capsys, "data", "validate", path)
    assert code == 0 and "6 valid feedback rows" in out
    code, out, err = cli(capsys, *train_args(path, "kto", tmp_path / "run"))
    assert code == 0, err
    assert "6 rows tokenized; 0 prompts and 1 completions truncated" in out


def test_a_file_of_one_label_warns_in_validate_and_stops_kto_unless_weights_are_set(tmp_path, capsys):
    path = BAD / "only_undesirable.jsonl"
    code, out, err = cli(capsys, "data", "validate", path)
    assert code == 0 and "6 valid feedback rows" in out
    assert f"warning: {path}: every row is undesirable" in err
    code, _, err = cli(capsys, *train_args(path, "kto", tmp_path / "a"))
    assert code == 2
    assert f"error: {path}: every example is undesirable; KTO needs desirable examples too" in err
    assert not (tmp_path / "a" / "config.yaml").exists()  # refused before the model is even loaded
    code, out, err = cli(capsys, *train_args(path, "kto", tmp_path / "b", "kto.desirable_weight=1.0",
                                             "kto.undesirable_weight=1.0"))
    assert code == 0, err
    assert "kto: desirable_weight=1, undesirable_weight=1 as configured" in out


def test_a_csv_without_the_label_column_names_it(tmp_path, capsys):
    path = BAD / "no_label_column.csv"
    code, _, err = cli(capsys, "data", "validate", path, "--format", "feedback")
    assert code == 2 and f"{path}: no row has the column 'label'" in err
    code, _, err = cli(capsys, *train_args(path, "kto", tmp_path / "run"))
    assert code == 2 and "holds sft rows (it has no 'label' column;" in err


# ------------------------------------------------------------------------------------- generated files
TEXTS = ["What is 2 + 2?", "4", "café au lait", "東京", "🙂 ok", 'a "quoted" word', "tab\there", "x,y", "Spain",
         "the capital of Spain is Madrid, not Seville", "new\nline", " padded ", "\\ backslash", "<|user|>"]
PLAIN_TEXTS = [t for t in TEXTS if "\n" not in t]  # csv line numbers assume one line per row
LABELS = {True: ["thumbs_up", "good", "1", "yes"], False: ["thumbs_down", "bad", "0", "no"]}
# value -> what parse_text / parse_label report: the field itself or its first message ("[0]")
BAD_TEXT = [(None, ""), ("", ""), ("   ", ""), (7, ""), (2.5, ""), (True, ""), ([], ""), ([1], "[0]"),
            ({"content": "no role"}, "[0]"), ([{"role": "robot", "content": "x"}], "[0]"),
            ([{"role": "user", "content": 3}], "[0]"), ("caf\ud800", "")]
BAD_LABEL = [None, "", "maybe", 2, 0.5, -1, [], {}, float("nan"), "thumbs sideways"]
BAD_ROLE = [None, "", "Forget", "keep", 1, ["forget"]]
ANY = "*"  # a bad row whose field may or may not be named


@dataclass
class Generated:
    """A generated file: its bytes, the format it is read as, and (when known) each bad row's field."""

    suffix: str
    data: bytes
    fmt: str
    n_rows: int | None  # None: damaged as a whole, so the number of rows is unknown
    bad: dict[int, str | None]


@st.composite
def texts(draw, *, plain: bool, role: str = "user"):
    text = draw(st.sampled_from(PLAIN_TEXTS if plain else TEXTS))
    if plain or not draw(st.booleans()):
        return text
    return [{"role": role, "content": text}]


@st.composite
def good_rows(draw, fmt: str, n: int, *, plain: bool, with_ids: bool):
    rows = []
    for i in range(n):
        row = {"id": f"r{i}"} if with_ids else {}
        row["prompt"] = draw(texts(plain=plain))
        if fmt == "preference":
            row["chosen"] = draw(texts(plain=plain, role="assistant"))
            rejected = f"not {i}"  # never equal to chosen
            chat = not plain and draw(st.booleans())
            row["rejected"] = [{"role": "assistant", "content": rejected}] if chat else rejected
        else:
            row["completion"] = draw(texts(plain=plain, role="assistant"))
        if fmt == "feedback":
            row["label"] = draw(st.sampled_from(LABELS[i % 2 == 0]))
        if fmt == "forget":
            row["role"] = "forget"
        rows.append(row)
    return rows


@st.composite
def row_damage(draw, fmt: str, container: str, rows: list, i: int, intact: list[int]):
    """Damage row ``i`` in place; return (the field the error names or None, replacement line bytes or None)."""
    row = rows[i]
    kinds = ["text", "missing"]
    kinds += {"feedback": ["label"], "forget": ["role"], "preference": ["same"], "sft": []}[fmt]
    if "id" in row and any(j < i for j in intact):
        kinds.append("duplicate_id")
    if container in ("jsonl", "json"):
        kinds += ["not_object", "wrong_id_type"]
    if container == "jsonl":
        kinds += ["truncated", "not_utf8", "deep", "huge_int"]
    if container == "csv":
        kinds += ["short", "long", "not_utf8"]
    kind = draw(st.sampled_from(kinds))
    text_fields = [f for f in FIELDS[fmt] if f not in ("label", "role")]
    if kind == "text":
        name = draw(st.sampled_from(text_fields))
        choices = BAD_TEXT if container in ("jsonl", "json") else [(None, ""), ("", ""), ("  ", "")]
        if container == "parquet":
            choices = choices[:2]  # one type per column: null and empty strings only
        value, suffix = draw(st.sampled_from(choices))
        row[name] = value
        return name + suffix, None
    if kind == "missing":
        name = draw(st.sampled_from(list(FIELDS[fmt])))
        if container in ("csv", "parquet"):  # a column cannot be absent from one row only: leave it empty
            row[name] = None if container == "parquet" else ""
        else:
            del row[name]
        return name, None
    if kind == "label":
        row["label"] = draw(st.sampled_from(BAD_LABEL if container in ("jsonl", "json") else ["", "maybe"]))
        return "label", None
    if kind == "role":
        choices = BAD_ROLE if container in ("jsonl", "json") else ["Forget", "keep"]
        row["role"] = draw(st.sampled_from(choices))
        return "role", None
    if kind == "same":
        row["rejected"] = row["chosen"]
        return "rejected", None
    if kind == "duplicate_id":
        row["id"] = rows[draw(st.sampled_from([j for j in intact if j < i]))]["id"]
        return "id", None
    if kind == "wrong_id_type":
        row["id"] = draw(st.sampled_from([1.5, True, [1], {"a": 1}]))
        return "id", None
    if kind == "not_object":
        return None, draw(st.sampled_from([b"[1, 2]", b'"text"', b"3", b"null", b"true"]))
    if kind == "truncated":
        line = json.dumps(row).encode()
        return None, line[:draw(st.integers(1, len(line) - 1))]
    if kind == "not_utf8":
        if container == "csv":
            name = draw(st.sampled_from(text_fields))
            row[name] = f"{row[name]}\x00NOT-UTF8\x00"
            return name, None
        line = json.dumps(row, ensure_ascii=False).encode()
        at = draw(st.integers(0, len(line)))
        return ANY, line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc"])) + line[at:]
    if kind == "deep":  # near Python's recursion limit it may still decode, and then fail as a field
        depth = draw(st.integers(900, 5000))
        return ANY, b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "huge_int":
        return None, b'{"prompt": "p", "completion": "c", "label": ' + b"9" * draw(st.integers(4301, 6000)) + b"}"
    if kind == "short":  # one cell fewer than the header: the last column is missing
        row["__cells__"] = -1
        return list(_columns(rows))[-1], None
    row["__cells__"] = 1  # "long": one cell more than the header
    return None, None


def _columns(rows: list) -> dict:
    return {k: None for r in rows for k in r if not k.startswith("__")}


def _serialize(container: str, rows: list, lines: dict[int, bytes]) -> bytes:
    if container == "jsonl":
        # a lone surrogate written raw is not UTF-8; written as \\ud800 it decodes to one: both are bad rows
        return b"".join(lines.get(i, json.dumps(r, ensure_ascii=i % 2 == 0).encode("utf-8", "surrogatepass"))
                        + b"\n" for i, r in enumerate(rows))
    if container == "json":
        return json.dumps([json.loads(lines[i]) if i in lines else r for i, r in enumerate(rows)]).encode()
    if container == "csv":
        header = list(_columns(rows))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            cells = ["" if r.get(k) is None else str(r[k]) for k in header]
            extra = r.get("__cells__", 0)
            writer.writerow(cells[:extra] if extra < 0 else cells + ["surplus"] * extra)
        return buf.getvalue().encode().replace(b"\x00NOT-UTF8\x00", b"\xfe\xff")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@st.composite
def damaged_rows(draw):
    """Good rows of one format in one container with 1..n rows damaged; every bad row is known."""
    fmt = draw(st.sampled_from(["feedback", "preference", "sft", "forget"]))
    container = draw(st.sampled_from(["jsonl", "jsonl", "json", "csv", "parquet"]))
    n = draw(st.integers(1, 8))
    plain = container in ("csv", "parquet") or draw(st.booleans())
    rows = draw(good_rows(fmt, n, plain=plain, with_ids=draw(st.booleans())))
    damaged = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    intact = [i for i in range(n) if i not in damaged]
    bad, lines = {}, {}
    for i in damaged:
        field, line = draw(row_damage(fmt, container, rows, i, intact))
        if line is not None:
            lines[i] = line
        bad[i + (2 if container == "csv" else 1)] = field
    return Generated(container, _serialize(container, rows, lines), fmt, n, bad)


@st.composite
def damaged_files(draw):
    """A file damaged as a whole: cut at any byte, random bytes, bytes spliced in, or nothing at all."""
    fmt = draw(st.sampled_from(["feedback", "preference", "sft", "forget"]))
    container = draw(st.sampled_from(["jsonl", "json", "csv", "parquet"]))
    rows = draw(good_rows(fmt, draw(st.integers(1, 6)), plain=True, with_ids=False))
    data = _serialize(container, rows, {})
    how = draw(st.sampled_from(["cut", "random", "splice", "empty", "blank"]))
    if how == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "random":
        data = draw(st.binary(max_size=300))
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=20)) + data[at:]
    elif how == "empty":
        data = b""
    else:
        data = b"\n \n\t\n"
    return Generated(container, data, fmt, None, {})


def check_generated(gen: Generated, folder: Path, byte_tok) -> None:
    """The promises for one generated file; any exception other than DataError fails the test."""
    path = folder / f"data.{gen.suffix}"
    path.write_bytes(gen.data)
    unit = "line" if gen.suffix in ("jsonl", "csv") else "row"
    listed = folder / "bad_rows.jsonl"
    listed.unlink(missing_ok=True)
    codes = {}
    for policy in ("error", "skip"):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            codes[policy] = main(["data", "validate", str(path), "--format", gen.fmt, f"data.on_bad_row={policy}",
                                  "--bad-rows", str(listed)])
        assert codes[policy] in (0, 2)
        if codes[policy] == 2:
            assert str(path) in err.getvalue(), err.getvalue()
        if policy == "error" and gen.bad:
            assert codes[policy] == 2
            for position, field in gen.bad.items():
                where = f"{path}, {unit} {position}" + (f", field '{field}" if field not in (None, ANY) else "")
                assert where in err.getvalue() or len(gen.bad) == gen.n_rows, (where, err.getvalue())
    if gen.bad and len(gen.bad) < gen.n_rows:  # some rows are good: they load, every bad one is recorded
        assert codes["skip"] == 0
        recorded = [json.loads(line) for line in listed.read_text(encoding="utf-8").splitlines()]
        assert [r[unit] for r in recorded] == sorted(gen.bad)
        for r in recorded:
            assert gen.bad[r[unit]] in (r["field"], ANY), (r, gen.bad)
    try:  # what training does next with the rows that passed: tokenize them
        loaded = load_examples(path, gen.fmt, on_bad_row="skip")
    except DataError as err:
        assert str(path) in str(err)
        return
    if gen.n_rows is not None:
        assert len(loaded.examples) + len(loaded.bad_rows) == gen.n_rows
    encode_examples(byte_tok, loaded.examples, TokenizeSettings(max_length=64, max_prompt_length=32))


def test_generated_bad_files_never_crash_the_validation_path(tmp_path, byte_tok, monkeypatch):
    seen = []
    monkeypatch.setattr(halokit.cli, "build_parser", functools.cache(halokit.cli.build_parser))  # 6 ms a call

    @settings(max_examples=520, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(damaged_rows(), damaged_rows(), damaged_rows(), damaged_files()))
    def check(gen):
        seen.append(gen)
        check_generated(gen, tmp_path, byte_tok)

    check()
    assert len(seen) >= 500
    assert sum(bool(g.bad) for g in seen) >= 300 and {g.suffix for g in seen} == {"jsonl", "json", "csv", "parquet"}


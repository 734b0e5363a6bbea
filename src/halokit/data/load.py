"""Load a data file into validated examples, under the ``on_bad_row`` policy.

Every row is checked before training starts. With ``on_bad_row="error"`` the first bad row stops the
load with a one-line message naming file, line/row and field (and how many more rows are bad); with
``"skip"`` the good rows load and every bad one is returned as a :class:`BadRow`, which the caller
writes to ``bad_rows.jsonl`` — nothing disappears silently.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from halokit.data.examples import Example, Format, LabelSpec, RowError, parse_row
from halokit.data.readers import read_rows, record_text, row_unit
from halokit.errors import DataError


@dataclass(frozen=True)
class BadRow:
    """A row that failed validation: where it is, which field, why, and its original text."""

    file: str
    position: int
    unit: str
    field: str | None
    reason: str
    raw: str | None = None

    def message(self) -> str:
        """``data.jsonl, line 7, field 'label': unknown label 'maybe'``."""
        where = f"{self.file}, {self.unit} {self.position}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}"


@dataclass
class Loaded:
    """The examples of one file, the rows that were skipped, and the file's name."""

    examples: list[Example]
    bad_rows: list[BadRow]
    file: str
    positions: list[int]


def load_examples(path: str | Path, fmt: Format, *, columns: Mapping[str, str] | None = None,
                  labels: LabelSpec | None = None, on_bad_row: Literal["error", "skip"] = "error",
                  default_role: str | None = None, split: str = "train") -> Loaded:
    """Read and validate every row of ``path`` as format ``fmt``.

    Raises DataError for a file-level problem (missing, unreadable, no rows, a column absent from
    every row) or, under ``on_bad_row="error"``, for the first bad row. Duplicate ids are bad rows.
    """
    file = str(path)
    unit = row_unit(path)
    examples: list[Example] = []
    positions: list[int] = []
    bad: list[BadRow] = []
    seen_ids: dict[str, int] = {}
    n_rows = 0
    for row in read_rows(path, split=split):
        n_rows += 1
        if row.error is not None:
            bad.append(BadRow(file, row.position, unit, row.field, row.error, row.raw))
            continue
        try:
            example = parse_row(row.record, fmt, columns=columns, labels=labels, default_role=default_role)
        except RowError as err:
            bad.append(BadRow(file, row.position, unit, err.field, str(err), row.raw or _dump(row.record)))
            continue
        if example.id is not None:
            first = seen_ids.setdefault(example.id, row.position)
            if first != row.position:
                bad.append(BadRow(file, row.position, unit, "id",
                                  f"duplicate id {example.id!r} (first seen at {unit} {first})",
                                  row.raw or _dump(row.record)))
                continue
        examples.append(example)
        positions.append(row.position)
    if n_rows == 0:
        raise DataError(f"{file}: no rows")
    _check_missing_column(file, bad, n_rows)
    if bad and on_bad_row == "error":
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0].message()}{more}; fix the file or set data.on_bad_row=skip to drop bad "
                        f"rows into bad_rows.jsonl")
    if not examples:
        raise DataError(f"{file}: all {n_rows} rows are bad; the first: {bad[0].message()}")
    return Loaded(examples, bad, file, positions)


def _check_missing_column(file: str, bad: list[BadRow], n_rows: int) -> None:
    """A field missing from every row is a file problem (a wrong column mapping), not n bad rows."""
    if n_rows < 2 or len(bad) != n_rows:
        return
    first = bad[0]
    if first.reason.startswith("missing field") and all(b.field == first.field and
                                                        b.reason.startswith("missing field") for b in bad):
        raise DataError(f"{file}: no row has the column '{first.field}'; {first.reason.split('; ', 1)[-1]} "
                        f"(map columns with data.columns.<field>=<column>)")


def write_bad_rows(bad_rows: Iterable[BadRow], path: str | Path) -> Path:
    """Write skipped rows as JSON lines: file, line/row, field, reason and the original row text.

    Written to a temporary file and renamed, so the file is whole or absent; DataError if it cannot be.
    """
    path = Path(path)
    lines = []
    for bad in bad_rows:
        record: dict[str, Any] = asdict(bad)
        record[record.pop("unit")] = record.pop("position")
        line = json.dumps(record, ensure_ascii=False)
        if not _encodable(line):  # a lone surrogate from the file: keep it as a \\u escape
            line = json.dumps(record)
        lines.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(lines), encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write the skipped rows ({err.strerror or err})") from err
    return path


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dump(record: Any) -> str | None:
    return None if record is None else record_text(record)


def detect_format(path: str | Path, *, columns: Mapping[str, str] | None = None, split: str = "train") -> Format:
    """Guess a file's format from the columns of its first readable row.

    ``chosen`` + ``rejected`` -> preference; ``label`` -> feedback; ``role`` -> forget; else sft.
    Column names are looked up through ``columns`` (halokit field -> file column).
    """
    columns = dict(columns or {})
    first_bad = None
    for row in read_rows(path, split=split):
        if row.record is None:
            first_bad = first_bad or BadRow(str(path), row.position, row_unit(path), row.field, row.error or "")
            continue
        keys = set(row.record)
        has = {name for name in ("chosen", "rejected", "label", "role") if columns.get(name, name) in keys}
        if {"chosen", "rejected"} <= has:
            return "preference"
        if "label" in has:
            return "feedback"
        if "role" in has:
            return "forget"
        return "sft"
    if first_bad is None:
        raise DataError(f"{path}: no rows")
    raise DataError(f"{path}: no row can be read, so its format cannot be detected; the first: "
                    f"{first_bad.message()}")

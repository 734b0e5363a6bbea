"""Read rows from data files, keeping each row's position so every problem can name it.

Supported: JSON Lines (``.jsonl``/``.ndjson``, position = line number), JSON (a list of objects, or an
object with a ``data``/``rows``/``examples`` list; position = row number), CSV (position = line number,
the header being line 1), Parquet (row number), a directory written by ``datasets.save_to_disk``,
and anything else ``datasets.load_dataset`` opens (a local script/folder, or a Hub id when online).

A row that cannot be decoded (broken JSON, invalid UTF-8, not an object) is yielded as a
:class:`RawRow` with ``error`` set instead of raising, so that the caller's ``on_bad_row`` policy
decides whether it stops the run or is skipped and recorded.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halokit.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass(frozen=True)
class RawRow:
    """One row as read from a file: ``record`` (column -> value) or ``error`` when it could not be read.

    ``position`` is 1-based: the line number for JSONL/CSV, the row number otherwise (see ``unit``).
    ``raw`` keeps the original text of the row when there is one (for ``bad_rows.jsonl``).
    """

    position: int
    record: dict[str, Any] | None
    error: str | None = None
    field: str | None = None
    raw: str | None = None


def row_unit(path: str | Path) -> str:
    """``"line"`` for line-oriented files (JSONL, CSV), else ``"row"``."""
    suffix = Path(path).suffix.lower()
    return "line" if suffix in JSONL_SUFFIXES or suffix == ".csv" else "row"


def read_rows(path: str | Path, *, split: str = "train") -> Iterator[RawRow]:
    """Yield every row of ``path`` in order. Raises DataError only for file-level problems."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix in JSONL_SUFFIXES:
            return _read_jsonl(p)
        if suffix == ".json":
            return _read_json(p)
        if suffix == ".csv":
            return _read_csv(p)
        if suffix in (".parquet", ".pq"):
            return _read_parquet(p)
        raise DataError(f"{p}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if p.is_dir():
        return _read_datasets_dir(p, split)
    if p.suffix or "/" not in str(path) or str(path).startswith((".", "/")):
        raise DataError(f"{path}: file not found")
    return _read_hub(str(path), split)


def _loads(text: str, *, multiline: bool = False) -> tuple[Any, str | None]:
    """``json.loads`` that never raises: ``(value, None)``, or ``(None, "invalid JSON ...")`` saying why."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        what = err.msg.removesuffix(" at")  # "Unterminated string starting at"
        if multiline:
            return None, f"invalid JSON at line {err.lineno}, column {err.colno}: {what}"
        return None, f"invalid JSON: {what} at column {err.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as err:  # an integer longer than sys.get_int_max_str_digits() digits
        return None, f"invalid JSON: {str(err).split(':')[0]}"


def record_text(record: Any) -> str | None:
    """The JSON text of a decoded record for bad_rows.jsonl, or None if it cannot be re-encoded."""
    try:
        return json.dumps(record, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        return None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raw = line.decode("utf-8", errors="replace").rstrip("\n")
                yield RawRow(lineno, None, f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column "
                                           f"{err.start + 1})", field=_undecodable_field(line), raw=raw)
                continue
            if not text.strip():
                continue
            record, error = _loads(text.rstrip("\r\n"))
            if error is not None:
                yield RawRow(lineno, None, error, raw=text.rstrip("\n"))
                continue
            if not isinstance(record, dict):
                yield RawRow(lineno, None, f"expected a JSON object, got {type(record).__name__}",
                             raw=text.rstrip("\n"))
                continue
            yield RawRow(lineno, record, raw=text.rstrip("\n"))


def _undecodable_field(line: bytes) -> str | None:
    """The top-level key whose value holds the bytes that are not UTF-8, when the rest of the line is JSON."""
    record, _ = _loads(line.decode("utf-8", errors="surrogateescape"))
    if not isinstance(record, dict):
        return None
    for key, value in record.items():
        if _undecodable(key):
            return None  # the bytes are in the field's name itself
        if _undecodable(record_text(value) or ""):
            return key
    return None


def _undecodable(text: str) -> bool:
    """Whether ``text`` holds bytes that ``surrogateescape`` kept because they are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_json(path: Path) -> Iterator[RawRow]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start})") from err
    data, error = _loads(text, multiline=True)
    if error is not None:
        raise DataError(f"{path}: {error}")
    if isinstance(data, dict):
        lists = [k for k in ("data", "rows", "examples") if isinstance(data.get(k), list)]
        if not lists:
            raise DataError(f"{path}: expected a JSON list of objects (or an object with a 'data' list)")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, record in enumerate(data, start=1):
        if isinstance(record, dict):
            yield RawRow(i, record, raw=record_text(record))
        else:
            yield RawRow(i, None, f"expected a JSON object, got {type(record).__name__}",
                         raw=record_text(record))


def _read_csv(path: Path) -> Iterator[RawRow]:
    # surrogateescape keeps undecodable bytes so the one bad field can be reported, not the whole file
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise DataError(f"{path}, line 1: cannot parse the CSV header: {err}") from err
    header = [h.strip() for h in header]
    lineno = 1
    while True:
        lineno = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield RawRow(lineno, None, f"cannot parse CSV: {err}")
            continue
        if not any(c.strip() for c in cells):
            continue
        raw = ",".join(cells).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        if len(cells) != len(header):
            missing = header[len(cells)] if len(cells) < len(header) else None  # first column without a cell
            yield RawRow(lineno, None, f"expected {len(header)} columns ({', '.join(header)}), got {len(cells)}",
                         field=missing, raw=raw)
            continue
        record: dict[str, Any] = {}
        bad = None
        for name, cell in zip(header, cells):
            if _undecodable(cell):
                bad = name
                break
            record[name] = _csv_value(cell)
        if bad is not None:
            yield RawRow(lineno, None, "not valid UTF-8", field=bad, raw=raw)
            continue
        yield RawRow(lineno, record, raw=raw)


def _csv_value(cell: str) -> Any:
    """CSV cells are strings; a cell holding a JSON list (chat messages) is decoded."""
    stripped = cell.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        value, error = _loads(stripped)
        return cell if error else value
    return cell


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {err}") from err
    try:
        records = table.to_pylist()
    except Exception:  # e.g. a timestamp outside Python's range: find the cells that fail, one by one
        yield from _parquet_cells(table)
        return
    for i, record in enumerate(records, start=1):
        yield RawRow(i, record)


def _parquet_cells(table: Any) -> Iterator[RawRow]:
    for i in range(table.num_rows):
        record, bad = {}, None
        for name in table.column_names:
            try:
                record[name] = table.column(name)[i].as_py()
            except Exception as err:  # pyarrow raises OverflowError, ValueError, ArrowInvalid, ...
                bad = bad or (name, f"{type(err).__name__}: {err}")
        if bad:
            yield RawRow(i + 1, None, f"cannot convert the value to Python ({bad[1]})", field=bad[0])
        else:
            yield RawRow(i + 1, record)


def _read_datasets_dir(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r}; available: {', '.join(ds)} (set data.split)")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(path), split=split)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot open as a datasets directory: {err}") from err
    for i, record in enumerate(ds, start=1):
        yield RawRow(i, dict(record))


def _read_hub(name: str, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(f"{name}: not a local file, and loading it from the Hugging Face Hub failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    for i, record in enumerate(ds, start=1):
        yield RawRow(i, dict(record))

"""Preparing a run directory: check it is writable, load and validate every data file the method needs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from halokit.config import Config, DataSettings
from halokit.data.convert import pairs_to_feedback
from halokit.data.examples import FIELDS, Example, FeedbackExample, Format, LabelSpec
from halokit.data.load import BadRow, detect_format, load_examples, write_bad_rows
from halokit.errors import UserError
from halokit.lock import RunLock
from halokit.methods import Method


def native_format(method: Method) -> Format:
    """The row format a method trains on: forget, preference, feedback or sft."""
    if method.needs_forget:
        return "forget"
    if method.needs_pairs:
        return "preference"
    if method.needs_labels:
        return "feedback"
    return "sft"


@dataclass
class RunData:
    """The validated examples of a run, by split, and the rows that were skipped."""

    run_dir: Path
    method: Method
    splits: dict[str, list[Example]] = field(default_factory=dict)
    bad_rows: list[BadRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{name}: {len(examples)} examples" for name, examples in self.splits.items()]
        if self.bad_rows:
            lines.append(f"{len(self.bad_rows)} bad rows skipped -> {self.run_dir / 'bad_rows.jsonl'}")
        return "\n".join(lines + self.notes)


@contextmanager
def claim_run_dir(output_dir: str | Path) -> Iterator[Path]:
    """Create ``output_dir`` and hold its :class:`RunLock` (main process only) for the whole run, so that a
    second run on the same directory is refused before it writes anything there (config, bad rows)."""
    run_dir = Path(output_dir)
    _check_writable(run_dir)
    main = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch set RANK; rank 0 holds the lock
    with RunLock(run_dir) if main else nullcontext():
        yield run_dir


def prepare_run(cfg: Config) -> RunData:
    """Create ``cfg.output_dir``, load every data file of the run, write ``bad_rows.jsonl`` if any row was
    skipped. KTO-style methods given preference data unpair it (KTO paper §4.1) and say so."""
    run_dir = Path(cfg.output_dir)
    _check_writable(run_dir)
    method = Method(cfg.method)
    run = RunData(run_dir, method)
    want = native_format(method)
    sources = {"train": cfg.data.train, "eval": cfg.data.eval}
    if method.needs_forget:
        sources = {"forget": cfg.data.forget, "retain": cfg.data.retain}
    for split, path in sources.items():
        if path is None:
            continue
        role = split if split in ("forget", "retain") else None
        examples, bad = _load_split(cfg.data, path, want, role, run)
        run.splits[split] = examples
        run.bad_rows.extend(bad)
    if run.bad_rows:
        write_bad_rows(run.bad_rows, run_dir / "bad_rows.jsonl")
    if method is Method.KTO and cfg.kto.desirable_weight is None and cfg.kto.undesirable_weight is None:
        _check_both_labels(cfg.data.train, run.splits["train"])
    _check_cache_dir(cfg, method)
    return run


def _check_both_labels(path: str, examples: list[Example]) -> None:
    """KTO's weights λ_D, λ_U come from the counts of each label (paper, Eq. 8), so it needs both."""
    n_d = sum(isinstance(e, FeedbackExample) and e.is_desirable for e in examples)
    if n_d in (0, len(examples)):
        kind, missing = ("undesirable", "desirable") if n_d == 0 else ("desirable", "undesirable")
        raise UserError(f"{path}: every example is {kind}; KTO needs {missing} examples too to set its weights "
                        f"(or set kto.desirable_weight and kto.undesirable_weight to train anyway)")


def _check_cache_dir(cfg: Config, method: Method) -> None:
    if cfg.train.cache_dir and method.needs_reference and cfg.train.reference in ("auto", "cache"):
        try:
            Path(cfg.train.cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"train.cache_dir {cfg.train.cache_dir}: cannot create it ({err.strerror})") from err


def _load_split(data: DataSettings, path: str, want: Format, role: str | None, run: RunData
                ) -> tuple[list[Example], list[BadRow]]:
    fmt = data.format or detect_format(path, columns=data.columns, split=data.split)
    if fmt != want and not (want == "feedback" and fmt == "preference"):
        missing = [repr(data.columns.get(f, f)) for f in FIELDS[want] if f not in FIELDS[fmt]]
        lacks = f"it has no {' or '.join(missing)} column; " if missing else ""
        raise UserError(f"{path}: {run.method.value} trains on {want} rows, but this file holds {fmt} rows "
                        f"({lacks}set data.format if the detection is wrong, or convert it with 'halokit data "
                        f"convert')")
    labels = LabelSpec.from_lists(data.desirable_values, data.undesirable_values, data.label_threshold)
    loaded = load_examples(path, fmt, columns=data.columns, labels=labels, on_bad_row=data.on_bad_row,
                           default_role=role, split=data.split)
    examples = loaded.examples
    if fmt == "preference" and want == "feedback":
        examples = pairs_to_feedback(examples)
        run.notes.append(f"{path}: {len(loaded.examples)} preference pairs unpaired into {len(examples)} "
                         f"feedback examples (KTO paper, §4.1)")
    return examples, loaded.bad_rows


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output_dir {run_dir}: cannot create it ({err.strerror})") from err
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"output_dir {run_dir}: not writable")

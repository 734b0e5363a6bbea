"""``halokit data validate | inspect | convert``: the data subcommands of :mod:`halokit.cli`.

Each loads one file with ``data.*`` overrides (format, columns, labels, bad-row policy) and either
reports bad rows (file, line, field), prints a summary, or converts feedback ↔ preference rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from halokit.errors import EXIT_USER_ERROR, UserError


def _data_settings(overrides: Sequence[str]):
    from halokit.config import DataSettings, build, parse_override, set_dotted

    values: dict = {}
    for item in overrides:
        key, value = parse_override(item)
        if not key.startswith("data."):
            raise UserError(f"override {item!r}: only data.* settings apply here, e.g. data.on_bad_row=skip")
        set_dotted(values, key[len("data."):], value)
    return build(DataSettings, values, "data.")


def _load(args: argparse.Namespace, on_bad_row: str | None = None):
    from halokit.data.examples import LabelSpec
    from halokit.data.load import detect_format, load_examples

    settings = _data_settings(args.overrides)
    fmt = args.format or settings.format or detect_format(args.file, columns=settings.columns,
                                                          split=settings.split)
    labels = LabelSpec.from_lists(settings.desirable_values, settings.undesirable_values,
                                  settings.label_threshold)
    policy = on_bad_row or settings.on_bad_row
    loaded = load_examples(args.file, fmt, columns=settings.columns, labels=labels, on_bad_row=policy,
                           split=settings.split)
    return loaded, fmt, settings


def cmd_data_validate(args: argparse.Namespace) -> int:
    from halokit.data.load import write_bad_rows

    loaded, fmt, settings = _load(args, on_bad_row="skip")
    n_bad = len(loaded.bad_rows)
    if n_bad and settings.on_bad_row == "error":
        for bad in loaded.bad_rows[:50]:
            print(bad.message(), file=sys.stderr)
        more = " (first 50 shown)" if n_bad > 50 else ""
        print(f"halokit data validate: {_rows(n_bad, 'bad')} in {args.file}{more}; fix them, or pass "
              f"data.on_bad_row=skip to drop them into {args.bad_rows}", file=sys.stderr)
        return EXIT_USER_ERROR
    msg = f"{args.file}: {len(loaded.examples)} valid {fmt} rows"
    if n_bad:
        path = write_bad_rows(loaded.bad_rows, args.bad_rows)
        msg += f"; {_rows(n_bad, 'bad')} skipped and written to {path}"
    print(msg)
    _warn_single_label(loaded.examples, args.file)
    return 0


def _rows(n: int, kind: str) -> str:
    return f"{n} {kind} row{'' if n == 1 else 's'}"


def _warn_single_label(examples, file: str) -> None:
    from halokit.data.examples import FeedbackExample

    if examples and isinstance(examples[0], FeedbackExample):
        n_d = sum(e.is_desirable for e in examples)
        if n_d in (0, len(examples)):
            kind = "desirable" if n_d else "undesirable"
            print(f"warning: {file}: every row is {kind}; KTO needs both labels to set its weights",
                  file=sys.stderr)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from halokit.data.convert import summarize

    loaded, fmt, settings = _load(args)
    length_fn = None
    if args.tokenizer:
        from halokit.data.tokenize import render
        from halokit.models import load_tokenizer

        tok = load_tokenizer(args.tokenizer)

        def length_fn(text):
            return len(tok(render(tok, text, "x", settings.chat_template)[0])["input_ids"])

    summary = summarize(loaded.examples, length_fn=length_fn)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
        return 0
    _print_summary(args.file, summary)
    _warn_single_label(loaded.examples, args.file)
    return 0


def _print_summary(file: str, summary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{file}[/bold]: {summary.n_examples} {summary.format} rows, "
                  f"{summary.n_prompts} distinct prompts")
    if summary.counts:
        total = sum(summary.counts.values())
        console.print("  " + ", ".join(f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in summary.counts.items()))
    table = Table(title=f"lengths ({summary.length_unit})")
    table.add_column("field")
    stats = list(next(iter(summary.lengths.values())))
    for s in stats:
        table.add_column(s, justify="right")
    for name, values in summary.lengths.items():
        table.add_row(name, *(f"{values[s]:.0f}" if s != "mean" else f"{values[s]:.1f}" for s in stats))
    console.print(table)
    if summary.kto_weights is not None:
        w = summary.kto_weights
        console.print(f"KTO weights: kto.desirable_weight={w.desirable_weight:.3g} "
                      f"kto.undesirable_weight={w.undesirable_weight:.3g}")
        console.print(f"  {w.explanation}")


def cmd_data_convert(args: argparse.Namespace) -> int:
    from halokit.data.convert import convert, write_examples

    loaded, fmt, _ = _load(args)
    out = convert(loaded.examples, args.to)
    if not out:
        raise UserError(f"{args.file}: converting {fmt} to {args.to} gave no rows (e.g. no prompt has both a "
                        f"desirable and an undesirable completion)")
    path = write_examples(out, args.out)
    print(f"{args.file}: {len(loaded.examples)} {fmt} rows -> {len(out)} {args.to} rows in {path}")
    return 0


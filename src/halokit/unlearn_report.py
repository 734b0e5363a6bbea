"""The unlearning study's report: a results table, notes and plots from ``results.json``.

Plots (PNG, also embedded in ``report.html``):

* ``curves_<split>.png`` — forget quality (log scale, with the 0.05 line) and model utility against the
  unlearning step, one line per method;
* ``tradeoff.png`` — forget quality against model utility at the final step (hollow) and at the best step
  keeping ≥ 80 % of the starting utility (filled), one panel per split;
* ``distance.png`` — ‖θ − θ₀‖₂ from the starting weights against the step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from halokit.render import flatten, load_json_object, write_documents

COLUMNS = ("split", "method", "steps", "utility @0", "final FQ", "final utility (kept)",
           "best FQ (≥80% utility)", "best step", "best utility (kept)")
COLORS = {"ga": "tab:red", "gd": "tab:orange", "npo": "tab:blue", "npo_rt": "tab:green", "simnpo": "tab:purple",
          "idk_dpo": "tab:brown"}


def _splits(runs: Mapping) -> list[int]:
    return sorted({int(r["split"]) for r in runs.values()})


def rows(results: Mapping) -> list[list[str]]:
    """One table row per split × method (strings, for Markdown, HTML and the console)."""
    out = []
    for r in sorted(results["runs"].values(), key=lambda r: (r["split"], r["method"])):
        f, b = r["final"], r["best"]
        out.append([f"{r['split']} %", r["method"], str(r["steps"]), f"{r['utility_start']:.3f}",
                    f"{f['forget_quality']:.2e}", f"{f['model_utility']:.3f} ({100 * f['utility_kept']:.0f} %)",
                    "—" if b is None else f"{b['forget_quality']:.2e}", "—" if b is None else str(b["step"]),
                    "—" if b is None else f"{b['model_utility']:.3f} ({100 * b['utility_kept']:.0f} %)"])
    return out


def print_table(results: Mapping, console: Console | None = None) -> None:
    """The results table on the console."""
    table = Table(title="unlearning: forget quality (FQ) and model utility")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("split", "method") else "right")
    for r in rows(results):
        table.add_row(*r)
    (console or Console()).print(table)


def plot_curves(runs: Mapping, split: int, out_png: Path) -> None:
    """Forget quality and model utility vs step for every method on ``split``."""
    fig = Figure(figsize=(11, 4))
    ax_fq, ax_mu = fig.subplots(1, 2)
    for r in runs.values():
        if r["split"] != split:
            continue
        steps = [p["step"] for p in r["curve"]]
        color = COLORS.get(r["method"])
        ax_fq.plot(steps, [max(p["forget_quality"], 1e-30) for p in r["curve"]], "o-", color=color,
                   label=r["method"])
        ax_mu.plot(steps, [p["model_utility"] for p in r["curve"]], "o-", color=color, label=r["method"])
    ax_fq.axhline(0.05, color="gray", linestyle="--", linewidth=1)
    ax_fq.set(yscale="log", xlabel="unlearning step", ylabel="forget quality (KS p-value)",
              title=f"forget {split} %: forget quality")
    ax_mu.set(xlabel="unlearning step", ylabel="model utility", title=f"forget {split} %: model utility",
              ylim=(0, None))
    ax_mu.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def _split_panels(runs: Mapping, height: float):
    """A figure with one panel per split; yields (axes, split, that split's runs)."""
    splits = _splits(runs)
    fig = Figure(figsize=(4.2 * len(splits), height))
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    return fig, [(ax, split, [r for r in runs.values() if r["split"] == split]) for ax, split in zip(axes, splits)]


def plot_tradeoff(runs: Mapping, out_png: Path) -> None:
    """Forget quality vs utility at the final step (hollow) and the best useful step (filled)."""
    fig, panels = _split_panels(runs, 4)
    for ax, split, split_runs in panels:
        for r in split_runs:
            color = COLORS.get(r["method"])
            f = r["final"]
            ax.scatter([f["model_utility"]], [max(f["forget_quality"], 1e-30)], facecolors="none",
                       edgecolors=color, s=60)
            if r["best"]:
                ax.scatter([r["best"]["model_utility"]], [max(r["best"]["forget_quality"], 1e-30)], color=color,
                           s=60, label=r["method"])
        ax.axhline(0.05, color="gray", linestyle="--", linewidth=1)
        ax.set(yscale="log", xlabel="model utility", ylabel="forget quality", title=f"forget {split} %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def plot_distance(runs: Mapping, out_png: Path) -> None:
    """‖θ − θ₀‖₂ against the step, one panel per split."""
    fig, panels = _split_panels(runs, 3.6)
    for ax, split, split_runs in panels:
        for r in split_runs:
            ax.plot([p["step"] for p in r["curve"]], [p["weight_distance"] for p in r["curve"]], "o-",
                    color=COLORS.get(r["method"]), label=r["method"])
        ax.set(xlabel="unlearning step", ylabel="‖θ − θ₀‖₂", title=f"forget {split} %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def write_report(out: str | Path) -> dict[str, Path]:
    """``report.md``, ``report.html`` and the plots from ``out/results.json``; returns ``{name: path}``."""
    out = Path(out)
    results = load_json_object(out / "results.json")
    runs = results["runs"]
    written: dict[str, Path] = {}
    blocks: list[tuple] = [
        ("h1", "halokit unlearning report"),
        ("p", f"seed {results.get('seed')}. Forget quality (FQ): p-value of the two-sample KS test between the "
              "forget-set truth ratios of the unlearned model and of a model fine-tuned without the forget set "
              "(higher is better; 0.05 is the usual line). Model utility: harmonic mean of probability, "
              "ROUGE-L recall and truth ratio on the retain, famous-people and world-facts sets. A collapsed "
              "model can score a high FQ because every answer looks equally unlikely, so the 'best' columns "
              "only consider steps keeping at least 80 % of the starting utility."),
        ("h2", "Results"), ("table", list(COLUMNS), rows(results))]
    notes = results.get("notes") or []
    if notes:
        blocks += [("h2", "Notes"), ("ul", [str(n) for n in notes])]
    blocks.append(("h2", "Forget quality and utility during unlearning"))
    for split in _splits(runs):
        name = f"curves_{split:02d}.png"
        written[name] = out / name
        plot_curves(runs, split, written[name])
        blocks.append(("img", name, f"forget {split} %: forget quality and model utility vs step"))
    for name, fn, alt, title in (("tradeoff.png", plot_tradeoff, "forget quality vs utility", "Trade-off"),
                                 ("distance.png", plot_distance, "distance from the starting weights",
                                  "Distance from the starting weights")):
        written[name] = out / name
        fn(runs, written[name])
        blocks += [("h2", title), ("img", name, alt)]
    if results.get("settings"):
        blocks += [("h2", "Settings"), ("table", ["setting", "value"], flatten(results["settings"]))]
    return write_documents(out, blocks, written)


def is_unlearning_results(run_dir: str | Path) -> bool:
    """Whether ``run_dir/results.json`` is an unlearning study's (``halokit report`` dispatches on it)."""
    path = Path(run_dir) / "results.json"
    try:
        return json.loads(path.read_text()).get("benchmark") == "unlearning"
    except (OSError, ValueError, AttributeError):
        return False

"""Reports from run directories: bootstrap CIs, plots, ``report.md`` / ``report.html`` and a console table.

Two kinds of directory:

* a **training run** (``metrics.jsonl``, ``config.yaml``): training curves (eval rows dashed), the final
  metrics and the config;
* a **demo run** (``results.json``, one sub-directory per trained model): the results table with bootstrap
  CIs and Δ vs SFT, per-category rates, notes, settings, desirable-rate bars and training curves per scenario.

The report is built once as a list of blocks and rendered twice, to Markdown and to HTML
(:mod:`halokit.render`). Plots use matplotlib's object-oriented ``Figure`` (Agg canvas on save): no backend switch, no
pyplot state, nothing global at import.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from halokit.errors import UserError
from halokit.render import flatten, load_json_object, write_documents

CURVE_KEYS = ("loss", "kl", "rewards/margins")
PLAIN_RUN_KEYS = ("loss", "kl", "rewards/margins", "forget_loss", "retain_loss", "grad_norm")
RESULT_COLUMNS = ("model", "greedy % [95% CI]", "sampled % [95% CI]", "judge", "KL to SFT", "mean length",
                  "Δ greedy vs SFT (pts)", "n prompts")
DASH = "—"

# ---------------------------------------------------------------- statistics and inputs


def bootstrap_ci(values: Sequence[float], *, n: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap CI: ``(mean, low, high)``.

    ``n`` resamples of ``len(values)`` items drawn with replacement (one item = one prompt, or one sample);
    ``low``/``high`` are the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of the resampled means.
    Deterministic for a given ``seed``. Values may be 0/1 labels or floats (e.g. judge scores).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sequence, got shape {v.shape}")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_ci needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n, v.size), dtype=np.int32)  # (n, N)
    means = v[idx].mean(axis=1)  # (n,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(low), float(high)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (train rows and ``eval/`` rows, in file order).

    Raises :class:`UserError` naming the file when it is missing, empty or holds a line that is not a JSON
    object.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no such file (a training run writes one JSON object per logged step)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{path}:{lineno}: expected a JSON object with a 'step' key")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no metrics rows (did training log any step?)")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where ``key`` is present and not null."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


# ---------------------------------------------------------------- plots


def plot_training_curves(run_dirs: Mapping[str, str | Path], out_png: str | Path,
                         keys: Sequence[str] = CURVE_KEYS) -> dict[str, list[str]]:
    """One subplot per key, one line per run (x = step); ``eval/<key>`` rows are drawn dashed.

    A run that lacks a key (SFT logs no ``kl``) is left out of that subplot, and a key no run has gets no
    subplot. Returns ``{key: [labels of the runs drawn]}`` for the subplots drawn.
    """
    runs = {label: read_metrics(d) for label, d in run_dirs.items()}
    drawn = {key: labels for key in keys if (labels := [
        lb for lb, rows in runs.items() if _series(rows, key)[0] or _series(rows, f"eval/{key}")[0]])}
    ncols = min(3, max(len(drawn), 1))
    nrows = max(math.ceil(len(drawn) / ncols), 1)
    fig = Figure(figsize=(4.3 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, labels) in zip(axes, drawn.items()):
        for i, label in enumerate(runs):
            if label not in labels:
                continue
            ax.plot(*_series(runs[label], key), color=f"C{i}", label=label)
            steps, values = _series(runs[label], f"eval/{key}")
            if steps:
                ax.plot(steps, values, color=f"C{i}", linestyle="--", marker=".", label=f"{label} (eval)")
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(drawn):]:
        ax.set_axis_off()
    if not drawn:
        axes[0].text(0.5, 0.5, f"no values for {', '.join(keys)}", ha="center", va="center")
    fig.savefig(out_png, dpi=100)
    return drawn


def plot_desirable_rates(results: Mapping, out_png: str | Path) -> None:
    """Grouped bars: per scenario, each method's desirable rate (%) with its CI as error bars.

    Left panel greedy, right panel sampled. Models without a scenario (the SFT baseline) are drawn as a
    dashed reference line with their CI as a band.
    """
    models = _models(results)
    grid = {(_scenario(k, m), _method(k, m)): m.get("metrics") or {} for k, m in models.items()}
    scenarios = list(dict.fromkeys(s for s, _ in grid if s is not None))
    methods = list(dict.fromkeys(meth for s, meth in grid if s is not None))
    width = 0.8 / max(len(methods), 1)
    fig = Figure(figsize=(5 + 1.2 * len(scenarios), 4), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 2, sharey=True), ("greedy", "sampled")):
        for j, method in enumerate(methods):
            bars = [(i, _rate(grid.get((s, method)), kind)) for i, s in enumerate(scenarios)]
            bars = [(i, r) for i, r in bars if r is not None]
            if not bars:
                continue
            xs = [i + (j - (len(methods) - 1) / 2) * width for i, _ in bars]
            mean = np.array([r[0] for _, r in bars]) * 100
            err = np.array([[r[0] - r[1], r[2] - r[0]] for _, r in bars]).T * 100  # (2, bars)
            ax.bar(xs, mean, width, yerr=np.nan_to_num(err), capsize=3, color=f"C{j}", label=method)
        for (s, meth), metrics in grid.items():
            if s is None and (r := _rate(metrics, kind)) is not None:
                ax.axhline(100 * r[0], color="0.3", linestyle="--", label=f"{meth} (reference)")
                if not math.isnan(r[1]):
                    ax.axhspan(100 * r[1], 100 * r[2], color="0.5", alpha=0.15)
        ax.set(title=f"{kind} decoding", xticks=range(len(scenarios)), ylim=(0, 105))
        ax.set_xticklabels(scenarios)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].set_ylabel("desirable % (held-out prompts)")
    fig.axes[0].legend(fontsize="small", loc="lower left")
    fig.savefig(out_png, dpi=100)


# ---------------------------------------------------------------- demo results


def _models(results: Mapping) -> dict[str, dict]:
    models = results.get("models") or {}
    if not isinstance(models, Mapping):
        raise UserError(f"results 'models' must be an object keyed by model name, got {type(models).__name__}")
    return {str(k): v for k, v in models.items() if isinstance(v, Mapping)}


def _scenario(key: str, model: Mapping) -> str | None:
    return model["scenario"] if "scenario" in model else (key.split("/")[0] if "/" in key else None)


def _method(key: str, model: Mapping) -> str:
    return model.get("method") or key.rsplit("/", 1)[-1]


def _rate(metrics: Mapping | None, kind: str) -> tuple[float, float, float] | None:
    """(mean, low, high) of the ``kind`` ("greedy"/"sampled") desirable rate, as stored in the results.

    A missing CI is bootstrapped from the per-prompt list (``greedy_desirable`` / ``sampled_desirable``),
    as is a missing mean; with neither, low and high are NaN.
    """
    if not metrics:
        return None
    summary = metrics.get(f"desirable_{kind}")
    if isinstance(summary, (int, float)) and not isinstance(summary, bool):
        summary = {"mean": summary}
    summary = summary if isinstance(summary, Mapping) else {}
    mean, ci = summary.get("mean"), summary.get("ci") or ()
    if not (len(ci) == 2 and None not in ci) and (values := metrics.get(f"{kind}_desirable")):
        boot = bootstrap_ci(values)
        mean, ci = boot[0] if mean is None else mean, boot[1:]
    if mean is None:
        return None
    return (float(mean), *map(float, ci)) if len(ci) == 2 and None not in ci else (float(mean), math.nan, math.nan)


def _fmt_rate(r: tuple[float, float, float] | None) -> str:
    if r is None:
        return DASH
    ci = "" if math.isnan(r[1]) else f" [{100 * r[1]:.1f}, {100 * r[2]:.1f}]"
    return f"{100 * r[0]:.1f}{ci}"


def _fmt(x, spec: str = ".4g") -> str:
    if x is None:
        return DASH
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _baseline(models: Mapping[str, Mapping]) -> str | None:
    """The SFT reference model: the one named "sft", else the first with method sft and no scenario."""
    if "sft" in models:
        return "sft"
    return next((k for k, m in models.items() if _method(k, m) == "sft" and _scenario(k, m) is None), None)


def result_rows(results: Mapping) -> list[list[str]]:
    """The results table as strings, one row per model, columns as :data:`RESULT_COLUMNS`.

    Rates are percentages with one decimal (``0.52`` → ``"52.0"``); Δ is the greedy rate minus the SFT
    baseline's, in percentage points, signed (``"+12.0"``); the baseline's own Δ is ``"—"``.
    """
    models = _models(results)
    base = _baseline(models)
    base_rate = _rate(models[base].get("metrics"), "greedy") if base else None
    rows = []
    for key, model in models.items():
        m = model.get("metrics") or {}
        greedy = _rate(m, "greedy")
        delta = DASH if key == base or greedy is None or base_rate is None else f"{100 * (greedy[0] - base_rate[0]):+.1f}"
        rows.append([key, _fmt_rate(greedy), _fmt_rate(_rate(m, "sampled")), _fmt(m.get("judge_score"), ".3f"),
                     _fmt(m.get("kl_to_sft"), ".3f"), _fmt(m.get("mean_length"), ".1f"), delta,
                     _fmt(m.get("n_prompts"), ".0f")])
    return rows


def results_table(results: Mapping) -> Table:
    """The results table (see :func:`result_rows`) as a rich Table for the console."""
    table = Table(title="held-out desirable rate (95% bootstrap CI over prompts)")
    for i, col in enumerate(RESULT_COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in result_rows(results):
        table.add_row(*row)
    return table


def print_results(results: Mapping, console: Console | None = None) -> None:
    """Print :func:`results_table` to ``console`` (default: a new stdout console)."""
    (console or Console()).print(results_table(results))


def _category_rows(models: Mapping[str, Mapping]) -> tuple[list[str], list[list[str]]]:
    per = {k: (m.get("metrics") or {}).get("per_category") or {} for k, m in models.items()}
    cats = list(dict.fromkeys(c for p in per.values() for c in p))
    rows = [[k] + [_fmt(None if p.get(c) is None else 100 * p[c], ".1f") for c in cats] for k, p in per.items()]
    return ["model"] + [f"{c} %" for c in cats], rows


# ---------------------------------------------------------------- reports


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``run_dir``; return ``{file name: path}``.

    A directory with ``results.json`` gets the demo report (results and per-category tables, notes,
    settings, ``desirable_rates.png``, ``curves_<scenario>.png`` and ``curves_sft.png``); any other gets
    the training-run report (``curves.png``, final metrics, config). Raises :class:`UserError` when
    ``metrics.jsonl`` of a plain run is missing or empty, or ``results.json`` cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    written: dict[str, Path] = {}
    results_path = run_dir / "results.json"
    blocks = _demo_blocks(run_dir, load_json_object(results_path), written) if results_path.is_file() \
        else _run_blocks(run_dir, written)  # blocks[0] is the h1 title
    return write_documents(run_dir, blocks, written)


def _demo_blocks(run_dir: Path, results: dict, written: dict[str, Path]) -> list[tuple]:
    models = _models(results)
    header = ", ".join(f"{k}: {results[k]}" for k in ("task", "seed", "quick") if k in results)
    blocks: list[tuple] = [
        ("h1", "halokit demo report"), ("p", header or "(no task, seed or quick recorded)"), ("h2", "Results"),
        ("p", "Desirable rate on held-out prompts in %, with a 95% percentile-bootstrap CI over prompts "
              "(sampled: over samples). Δ: greedy rate minus the SFT model's, in percentage points."),
        ("table", list(RESULT_COLUMNS), result_rows(results))]
    written["desirable_rates.png"] = run_dir / "desirable_rates.png"
    plot_desirable_rates(results, written["desirable_rates.png"])
    blocks.append(("img", "desirable_rates.png", "desirable rate per scenario and method"))
    cat_header, cat_rows = _category_rows(models)
    if len(cat_header) > 1:
        blocks += [("h2", "Desirable rate per category (greedy)"), ("table", cat_header, cat_rows)]
    notes = results.get("notes") or []
    if notes:
        blocks += [("h2", "Notes"), ("ul", [notes] if isinstance(notes, str) else [str(n) for n in notes])]
    if results.get("settings"):
        blocks += [("h2", "Settings"), ("table", ["setting", "value"], flatten(results["settings"]))]
    blocks.append(("h2", "Training curves"))
    groups: dict[str, dict[str, Path]] = {}
    missing = []
    for key, model in models.items():
        d = run_dir / str(model["run_dir"]) if model.get("run_dir") else None
        if d is not None and (d / "metrics.jsonl").is_file():
            groups.setdefault(_scenario(key, model) or "sft", {})[key] = d
        else:
            missing.append(key)
    for group, dirs in groups.items():
        name = f"curves_{re.sub(r'[^A-Za-z0-9_.-]+', '_', group)}.png"
        written[name] = run_dir / name
        plot_training_curves(dirs, written[name])
        blocks += [("h3", group), ("img", name, f"training curves: {group}")]
    if missing:
        blocks.append(("p", f"No metrics.jsonl (run directory missing or reused) for: {', '.join(missing)}."))
    return blocks


def _run_blocks(run_dir: Path, written: dict[str, Path]) -> list[tuple]:
    rows = read_metrics(run_dir)
    train = [r for r in rows if not any(k.startswith("eval/") for k in r)]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    written["curves.png"] = run_dir / "curves.png"
    plot_training_curves({"train": run_dir}, written["curves.png"], keys=PLAIN_RUN_KEYS)
    last, last_eval = (train[-1] if train else {}), (evals[-1] if evals else {})
    names = [k for k in last if k != "step"]
    names += [k[5:] for k in last_eval if k.startswith("eval/") and k[5:] not in names]
    table = [[k, _fmt(last.get(k)), _fmt(last_eval.get(f"eval/{k}"))] for k in names]
    config = run_dir / "config.yaml"
    return [("h1", f"halokit training report: {run_dir.name}"),
            ("p", f"{len(train)} logged steps, {len(evals)} evaluations; last step {rows[-1]['step']}."),
            ("h2", "Training curves"), ("img", "curves.png", "training curves (eval dashed)"),
            ("h2", "Final metrics"),
            ("table", ["metric", f"train (step {last.get('step', DASH)})",
                       f"eval (step {last_eval.get('step', DASH)})"], table),
            ("h2", "Config"),
            ("pre", config.read_text(encoding="utf-8") if config.is_file() else "(no config.yaml)")]

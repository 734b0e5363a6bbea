"""The protocol: fresh process per trial, alternated A/B rounds, a matmul probe guard, medians and paired ratios.

Every trial runs ``python -m benchmarks.trial`` with the same environment on both sides: 2 threads,
``MALLOC_MMAP_THRESHOLD_`` fixed, offline. Within a round every variant of a cell runs once, in an
order rotated from round to round; a trial whose matmul ceiling moved by more than ``DRIFT`` between
its probe before and after is dropped and run again (up to ``RETRIES`` times), and left out of the
medians if it never settles.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import EPOCHS

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
# Fixed for both sides. Blocks above it come from mmap and go back to the OS on free, so peak RSS follows the
# live tensors instead of what glibc's adaptive threshold (up to 32 MiB) keeps in the heap; 4 MiB keeps the
# page-fault cost of re-mapping small activations out of the timings (128 KiB made both sides ~1.6x slower).
MMAP_THRESHOLD = 4 << 20
# A trial is dropped when the matmul probe moved more than this between before and after it. On a shared AMX
# machine the probe before a trial reads 10-30 % below the one after it in the same process (a warm-up
# effect that a discarded first probe does not remove), so the guard catches a neighbour taking a large
# share of the machine, not small drifts; paired ratios within a round absorb the rest.
DRIFT = 0.35
RETRIES = 1
# Each trial trains EPOCHS (common.py) epochs over the same data and is timed over the last one only: the first compiles
# every kernel the run needs. bf16 matmuls on CPU (oneDNN/AMX) are compiled per GEMM shape, ~2-4 ms each against
# ~0.3 ms for the product, so a cold epoch measures mostly compilation; a long run has met all its shapes after a
# few hundred steps (TRL: one per padded width; halokit: one per bucketed row width) and runs warm from then on.
TRIAL_TIMEOUT_S = 900


@dataclass
class Cell:
    """One benchmark × shape × data variant, with the variants it compares and its workspace file."""

    method: str
    shape: str
    data: str
    variants: list[str]
    fast: str = "bfloat16"  # the dtype this CPU trains faster in (common.fast_dtype): TRL's best settings use it
    workspace: str = ""
    trials: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.shape}/{self.data}"


def trial_env(workdir: Path) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(workdir / "hf-datasets"), HALOKIT_CACHE=str(workdir / "halokit-cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_WAIT_POLICY", None)
    return env


def run_trial(workspace: str, variant: str, workdir: Path, profile_step: int | None = None,
              fast: str = "bfloat16") -> dict:
    """One trial in a fresh process; its measurements, or ``{"error": ...}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"workspace": workspace, "variant": variant, "workdir": str(workdir),
                                "threads": THREADS, "profile_step": profile_step,
                                "fast": fast}))
    out = workdir / "out.json"
    with open(workdir / "log.txt", "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.trial", str(spec), str(out)], cwd=ROOT,
                                  env=trial_env(workdir), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=TRIAL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "error": f"timed out after {TRIAL_TIMEOUT_S} s"}
    if proc.returncode != 0 or not out.is_file():
        tail = (workdir / "log.txt").read_text()[-2000:]
        return {"variant": variant, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(out.read_text())


def drift(result: dict) -> float:
    before, after = result["ceiling_before"], result["ceiling_after"]
    return abs(after / before - 1.0)


def measure(result: dict, workspace: dict) -> dict:
    """Tokens/s, useful FLOP/s and MFU over the last (warm) epoch, from a trial and its workspace; also the
    first (cold) epoch's tokens/s."""
    side = result["side"]
    begin, end = result["begin"], result["end"]
    n = len(workspace["steps"][side])
    if len(begin) != EPOCHS * n:
        raise RuntimeError(f"{result['variant']} ran {len(begin)} steps, expected {EPOCHS} epochs of {n}")
    batches = result.get("batches")
    if side == "halokit" and (batches[:n] != workspace["steps"]["halokit"]
                              or any(sorted(batches[e * n:(e + 1) * n]) != sorted(batches[:n]) for e in range(EPOCHS))):
        raise RuntimeError("halokit's batches differ from the plan the FLOP counter used")
    seconds = end - begin[(EPOCHS - 1) * n]
    tokens = sum(workspace["tokens"][side])
    flops = sum(workspace["flops"][side])
    ceiling = max(result["ceiling_before"], result["ceiling_after"])  # the machine's best: MFU errs low
    return {"tokens_per_s": tokens / seconds, "useful_flops_per_s": flops / seconds, "ceiling": ceiling,
            "mfu": flops / seconds / ceiling, "step_s": seconds / n,
            "cold_tokens_per_s": tokens / (begin[n] - begin[0]) if EPOCHS > 1 else None}


def run_cell(cell: Cell, rounds: int, work: Path, log=print, *, retries: int = RETRIES) -> Cell:
    """``rounds`` alternated rounds over the cell's variants; trials kept in ``cell.trials``."""
    workspace = json.loads(Path(cell.workspace).read_text())
    cell.trials = {v: [] for v in cell.variants}
    for r in range(rounds):
        order = cell.variants[r % len(cell.variants):] + cell.variants[:r % len(cell.variants)]
        for variant in order:
            for attempt in range(retries + 1):
                t = time.perf_counter()
                res = run_trial(cell.workspace, variant, work / f"{cell.method}-{cell.shape}-{cell.data}" /
                                f"r{r}-{variant}-a{attempt}", fast=cell.fast)
                res.update(round=r, attempt=attempt, wall_s=time.perf_counter() - t)
                if "error" in res:
                    log(f"  {cell.method} {cell.name} round {r} {variant}: FAILED {res['error'][-300:]}")
                    break
                res.update(measure(res, workspace), drift=drift(res), stable=drift(res) <= DRIFT)
                log(f"  {cell.method} {cell.name} round {r} {variant:13s} {res['tokens_per_s']:7.0f} tok/s  "
                    f"rss {res['peak_rss'] / 2**20:6.0f} MiB  mfu {res['mfu']:.2f}  probe drift "
                    f"{res['drift']:.2f}{'' if res['stable'] else ' (dropped)'}  [{res['wall_s']:.0f} s]")
                if res["stable"]:
                    break
            cell.trials[variant].append(res)
    return cell


def kept(trials: list[dict], unstable: bool = False) -> list[dict]:
    """The trials that count: stable ones (``unstable``: every trial that ran, as ``--quick`` reports them)."""
    return [t for t in trials if "error" not in t and (unstable or t.get("stable"))]


def summarize(cell: Cell, pairs: list[tuple[str, str]], *, unstable: bool = False) -> dict:
    """Medians per variant and median paired ratios (same round) for ``pairs`` of (halokit, TRL) variants."""
    variants = {}
    for v, trials in cell.trials.items():
        ok = kept(trials, unstable)

        def med(key: str, ok: list[dict] = ok) -> float | None:
            return statistics.median(t[key] for t in ok) if ok else None

        variants[v] = {
            "tokens_per_s": med("tokens_per_s"), "cold_tokens_per_s": med("cold_tokens_per_s"), "peak_rss_mib": med("peak_rss") and med("peak_rss") / 2**20,
            "mfu": med("mfu"), "useful_gflops_per_s": med("useful_flops_per_s") and med("useful_flops_per_s") / 1e9,
            "ceiling_gflops_per_s": med("ceiling") and med("ceiling") / 1e9, "step_s": med("step_s"),
            "reference_s": med("reference_s") if ok and ok[0].get("reference_s") is not None else None,
            "step0_loss": [t["step0_loss"] for t in ok], "tokens_per_s_all": [t["tokens_per_s"] for t in ok],
            "trials_kept": len(ok), "trials_dropped": sum(1 for t in trials if "error" not in t and not t.get("stable")),
            "errors": [t["error"] for t in trials if "error" in t],
            "dtype": ok[0]["dtype"] if ok else None,
        }
    ratios = {}
    for a, b in pairs:
        if a not in cell.trials or b not in cell.trials:
            continue
        by_round = {t["round"]: t for t in kept(cell.trials[b], unstable)}
        speed, rss = [], []
        for t in kept(cell.trials[a], unstable):
            other = by_round.get(t["round"])
            if other:
                speed.append(t["tokens_per_s"] / other["tokens_per_s"])
                rss.append(t["peak_rss"] / other["peak_rss"])
        ratios[f"{a} / {b}"] = {"tokens_per_s": statistics.median(speed) if speed else None,
                                "peak_rss": statistics.median(rss) if rss else None, "pairs": len(speed),
                                "tokens_per_s_all": speed}
    return {"variants": variants, "ratios": ratios}

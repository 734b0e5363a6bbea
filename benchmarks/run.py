"""``make bench``: KTO and DPO, halokit vs TRL, under the fair protocol; writes results.md and results.json.

    python -m benchmarks.run                 # the full benchmark (~40 min on 2 shared cores)
    python -m benchmarks.run --quick         # one short alternation on one shape (smoke test, ~2 min)
    python -m benchmarks.run --only kto --rounds 7 --out /tmp/bench

See benchmarks/harness.py for the protocol and benchmarks/common.py for shapes, data and FLOP counting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import dpo_vs_trl, harness, kto_vs_trl, report
from benchmarks.common import SHAPES, build_workspace, fast_dtype
from benchmarks.trial import halokit_variant

BENCHMARKS = {"kto": kto_vs_trl, "dpo": dpo_vs_trl}
HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one alternation of halokit vs trl-best, head-heavy")
    p.add_argument("--rounds", type=int, help="alternated rounds per cell (default 5; --quick: 1)")
    p.add_argument("--steps", type=int, help="optimizer steps per epoch (default 6; each trial runs a warm-up epoch, then a timed one)")
    p.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark")
    p.add_argument("--out", type=Path, help="where results.md/json go (default: benchmarks/; --quick: the work dir)")
    p.add_argument("--work", type=Path, help="scratch directory for models, data and trial logs (default: a temp dir)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled trials behind 'where the time goes'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 6)
    work = args.work or Path(tempfile.mkdtemp(prefix="halokit-bench-"))
    out = args.out or (work if args.quick else HERE)
    started, load_before = time.time(), os.getloadavg()
    names = [args.only] if args.only else list(BENCHMARKS)
    fast, gemm_gflops = fast_dtype()
    print(f"matmul probe: float32 {gemm_gflops['float32']:.1f}, bfloat16 {gemm_gflops['bfloat16']:.1f} GFLOP/s "
          f"-> best settings use {fast}")
    print(f"benchmark: {', '.join(names)}; {rounds} round(s) of {steps} steps per trial; work dir {work}")
    results: dict = {"benchmarks": {}, "loss_equality": [], "profile": {}}
    for name in names:
        module = BENCHMARKS[name]
        results["benchmarks"][name] = {}
        for cell in module.cells(args.quick, fast):
            cell.workspace = str(build_workspace(work / "data", cell.method, cell.shape, cell.data, steps))
            print(f"{name} {cell.name}: {', '.join(cell.variants)}")
            harness.run_cell(cell, rounds, work / "trials", retries=0 if args.quick else harness.RETRIES)
            summary = harness.summarize(cell, module.pairs(fast), unstable=args.quick)
            summary["workspace"] = json.loads(Path(cell.workspace).read_text())
            results["benchmarks"][name][cell.name] = summary
    if not args.no_profile and not args.quick:
        results["profile"] = profile(work, steps, names, fast)
    shapes = {"head-heavy": SHAPES["head-heavy"]} if args.quick else SHAPES
    for name in names:
        print(f"{name}: step-0 loss equality (float32)")
        results["loss_equality"] += BENCHMARKS[name].loss_equality(shapes)
    results["run"] = {"quick": args.quick, "rounds": rounds, "steps": steps, "epochs": harness.EPOCHS,
                      "threads": harness.THREADS, "mmap_threshold": harness.MMAP_THRESHOLD,
                      "drift_limit": harness.DRIFT, "fast_dtype": fast, "gemm_gflops": gemm_gflops,
                      "minutes": (time.time() - started) / 60,
                      "load_before": load_before, "load_after": os.getloadavg()}
    results["machine"] = report.machine()
    results["targets"] = report.targets(results, {n: BENCHMARKS[n].targets(fast) for n in names})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report.strip(results), indent=1))
    (out / "results.md").write_text(report.markdown(results))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'} in {results['run']['minutes']:.1f} min")
    for row in results["targets"]:
        print(f"  {row['benchmark']} {row['cell']} {row['pair']}: {row['measured']} (target {row['target']}) "
              f"{'met' if row['met'] else 'MISSED'}")
    return 0


def profile(work: Path, steps: int, names: list[str], fast: str) -> dict:
    """One profiled step (torch.profiler, the third of the warm epoch) per side on body-heavy variable-length
    data: time by op kind."""
    split = {}
    for name in names:
        workspace = str(build_workspace(work / "data", name, "body-heavy", "variable", steps))
        for variant in (halokit_variant(fast), "trl-best"):
            res = harness.run_trial(workspace, variant, work / "profile" / f"{name}-{variant}", profile_step=steps + 2,
                                    fast=fast)
            path = work / "profile" / f"{name}-{variant}" / "profile.json"
            if "error" not in res and path.is_file():
                split[f"{name} {variant}"] = json.loads(path.read_text())
    return split


if __name__ == "__main__":
    sys.exit(main())

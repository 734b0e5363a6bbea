"""halokit's KTO and DPO losses equal TRL's at step 0 on the same batch and weights (float32), and the
side-by-side benchmark runs end to end (``--quick``).

Skipped where TRL is not installed: CI installs only the dev extra; ``pip install -e '.[bench]'`` adds it.
The reference is the policy with noisy weights (benchmarks/equality.py), so log-ratios, DPO margins and
KTO's z₀ are far from 0 and a mismatch in tokens, KL pairs or formulas shows up.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives next to src/, not inside it
    sys.path.insert(0, str(ROOT))

from benchmarks.equality import step0_losses  # noqa: E402

REL = 1e-5


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_kto_step0_loss_and_reference_point_equal_trl():
    """Same tokens, same KL pairs (TRL fed the batch reversed), same z₀ and loss to 1e-5 relative."""
    r = step0_losses("kto")
    assert r["same_tokens"]
    assert r["halokit"]["kl"] > 0.1  # z₀ is not clamped to 0: the pairing is exercised
    # z₀ is a mean of differences of ~60-nat float32 log-probs, summed in another order by each side: its
    # rounding is ~1e-5 nats, so it is compared in absolute nats; the loss keeps the 1e-5 relative bar
    assert abs(r["halokit"]["kl"] - r["trl"]["kl"]) < 1e-4
    assert r["rel_diff"] < REL
    assert abs(r["halokit"]["loss"] - 0.5) > 1e-3  # not the trivial policy == reference value


def test_kto_check_sees_a_different_pairing():
    """In halokit's order TRL pairs each prompt with the other neighbour's completion: z₀ moves by far more
    than the tolerance, so the equality above really pins the pairing convention."""
    r = step0_losses("kto", pairing="trl-native")
    assert rel(r["trl"]["kl"], r["halokit"]["kl"]) > 100 * REL


def test_dpo_step0_loss_equals_trl():
    r = step0_losses("dpo")
    assert r["same_tokens"]
    assert r["rel_diff"] < REL
    assert abs(r["halokit"]["loss"] - math.log(2)) > 1e-3  # margins far from 0


@pytest.mark.slow
def test_benchmark_quick_writes_results(tmp_path):
    """``python -m benchmarks.run --quick``: every trial runs, and results.json / results.md hold the tables."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path),
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    fast = results["run"]["fast_dtype"]
    halokit = "halokit-bf16" if fast == "bfloat16" else "halokit-fp32"
    rates = results["run"]["gemm_gflops"]
    assert fast == max(rates, key=rates.get)  # the faster dtype of the probe
    for method in ("kto", "dpo"):
        cell = results["benchmarks"][method]["head-heavy/variable"]
        for variant in (halokit, "trl-best"):
            v = cell["variants"][variant]
            assert v["dtype"] == f"torch.{fast}"
            assert v["errors"] == [] and v["trials_kept"] == 1
            assert v["tokens_per_s"] > 0 and v["peak_rss_mib"] > 0 and 0 < v["mfu"] < 1.5
        ratio = cell["ratios"][f"{halokit} / trl-best"]
        assert ratio["pairs"] == 1 and ratio["tokens_per_s"] > 0
        assert len(cell["steps"]["halokit"]["tokens"]) == len(cell["steps"]["trl"]["tokens"])
    assert {e["method"] for e in results["loss_equality"]} == {"kto", "dpo"}
    assert all(e["rel_diff"] < REL for e in results["loss_equality"])
    md = (tmp_path / "results.md").read_text()
    for heading in ("## Machine", "## Protocol", "## KTO", "## DPO", "## Step-0 loss equality"):
        assert heading in md

"""DPO: halokit vs TRL's DPOTrainer on the same model, data, batch, optimizer and lr.

    python -m benchmarks.dpo_vs_trl [--quick] [--rounds N]

prints the table for DPO alone; ``python -m benchmarks.run`` (``make bench``) runs KTO and DPO and
writes benchmarks/results.md and results.json.
"""

from __future__ import annotations

import sys

from benchmarks.equality import step0_losses
from benchmarks.harness import Cell
from benchmarks.trial import halokit_variant

METHOD = "dpo"


def pairs(fast: str) -> list[tuple[str, str]]:
    """halokit in the faster dtype against TRL's defaults and its best settings. No float32-vs-float32 cell: that
    comparison separates the engine from the dtype on KTO, and the fixed-length variant isolates packing, the
    same mechanism here; leaving both out keeps `make bench` within its time budget."""
    return [(halokit_variant(fast), "trl-default"), (halokit_variant(fast), "trl-best")]


def targets(fast: str) -> dict[tuple[str, str], tuple[float, float | None]]:
    """The issue's target: at least 1.5x TRL's best settings."""
    return {(halokit_variant(fast), "trl-best"): (1.5, None)}


def cells(quick: bool = False, fast: str = "bfloat16") -> list[Cell]:
    """Variable-length data on both shapes (``quick``: head-heavy, halokit vs TRL's best)."""
    h = halokit_variant(fast)
    if quick:
        return [Cell(METHOD, "head-heavy", "variable", [h, "trl-best"], fast)]
    return [Cell(METHOD, shape, "variable", [h, "trl-best", "trl-default"], fast) for shape in ("head-heavy", "body-heavy")]


def loss_equality(shapes: dict[str, dict]) -> list[dict]:
    """Step-0 loss of both sides on one batch of pairs, float32, at each benchmark shape."""
    return [dict(step0_losses(METHOD, shape), shape=name) for name, shape in shapes.items()]


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", METHOD, *sys.argv[1:]]))

"""DPO: halokit vs TRL's DPOTrainer on the same model, data, batch, optimizer and lr.

    python -m benchmarks.dpo_vs_trl [--quick] [--rounds N]

prints the table for DPO alone; ``python -m benchmarks.run`` (``make bench``) runs KTO and DPO and
writes benchmarks/results.md and results.json.
"""

from __future__ import annotations

import sys

from benchmarks.equality import step0_losses
from benchmarks.harness import Cell

METHOD = "dpo"
# bf16 only: the float32-vs-float32 comparison that separates the engine from the dtype is made on KTO,
# and the fixed-length variant too (it isolates packing, the same mechanism here); this keeps `make bench`
# within its time budget.
VARIANTS = ["halokit-bf16", "trl-best", "trl-default"]
PAIRS = [("halokit-bf16", "trl-default"), ("halokit-bf16", "trl-best")]
TARGETS = {("halokit-bf16", "trl-best"): (1.5, None)}


def cells(quick: bool = False) -> list[Cell]:
    """Both shapes on variable-length data."""
    if quick:
        return [Cell(METHOD, "head-heavy", "variable", ["halokit-bf16", "trl-best"])]
    return [Cell(METHOD, shape, "variable", list(VARIANTS)) for shape in ("head-heavy", "body-heavy")]


def loss_equality(shapes: dict[str, dict]) -> list[dict]:
    """Step-0 loss of both sides on one batch of pairs, float32, at each benchmark shape."""
    return [dict(step0_losses(METHOD, shape), shape=name) for name, shape in shapes.items()]


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", METHOD, *sys.argv[1:]]))

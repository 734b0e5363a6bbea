"""KTO: halokit vs TRL's KTOTrainer on the same model, data, batch, optimizer and lr.

    python -m benchmarks.kto_vs_trl [--quick] [--rounds N]

prints the table for KTO alone; ``python -m benchmarks.run`` (``make bench``) runs KTO and DPO and
writes benchmarks/results.md and results.json.
"""

from __future__ import annotations

import sys

from benchmarks.equality import step0_losses
from benchmarks.harness import Cell

METHOD = "kto"
# halokit in float32 and bf16 autocast; TRL with its defaults (bf16, gradient checkpointing, live reference),
# its best CPU settings (bf16, precomputed reference, no checkpointing) and the same in float32.
VARIANTS = ["halokit-bf16", "trl-best", "trl-default", "halokit-fp32", "trl-fp32"]
PAIRS = [("halokit-bf16", "trl-default"), ("halokit-bf16", "trl-best"), ("halokit-fp32", "trl-fp32")]
# (halokit, TRL) pairs with targets: tokens/s ratio at least, peak-RSS ratio at most
TARGETS = {("halokit-bf16", "trl-default"): (3.0, None), ("halokit-bf16", "trl-best"): (2.0, 0.7)}


def cells(quick: bool = False) -> list[Cell]:
    """Variable-length data: bf16 variants on both shapes, and float32 against float32 on body-heavy (where the
    backbone, not the LM head, dominates and the dtype matters most); fixed-length data: the main pair on both
    shapes. Fewer cells than the full cross product, so that `make bench` stays within ~40 minutes."""
    if quick:
        return [Cell(METHOD, "head-heavy", "variable", ["halokit-bf16", "trl-best"])]
    return [Cell(METHOD, "head-heavy", "variable", VARIANTS[:3]), Cell(METHOD, "body-heavy", "variable", VARIANTS)] + \
        [Cell(METHOD, shape, "fixed", ["halokit-bf16", "trl-best"]) for shape in ("head-heavy", "body-heavy")]


def loss_equality(shapes: dict[str, dict]) -> list[dict]:
    """Step-0 loss (and z₀) of both sides on one batch, float32, at each benchmark shape."""
    return [dict(step0_losses(METHOD, shape), shape=name) for name, shape in shapes.items()]


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", METHOD, *sys.argv[1:]]))

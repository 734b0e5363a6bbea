"""KTO: halokit vs TRL's KTOTrainer on the same model, data, batch, optimizer and lr.

    python -m benchmarks.kto_vs_trl [--quick] [--rounds N]

prints the table for KTO alone; ``python -m benchmarks.run`` (``make bench``) runs KTO and DPO and
writes benchmarks/results.md and results.json.
"""

from __future__ import annotations

import sys

from benchmarks.equality import step0_losses
from benchmarks.harness import Cell
from benchmarks.trial import halokit_variant

METHOD = "kto"


def pairs(fast: str) -> list[tuple[str, str]]:
    """(halokit, TRL) pairs with a paired ratio: halokit in the faster dtype against TRL's defaults and its best
    settings; on a bf16 CPU also float32 against float32, which separates the engine's savings from the dtype's
    (on a float32 CPU TRL's best *is* float32)."""
    h = halokit_variant(fast)
    return [(h, "trl-default"), (h, "trl-best")] + ([("halokit-fp32", "trl-fp32")] if fast == "bfloat16" else [])


def targets(fast: str) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(halokit, TRL) pair -> (tokens/s ratio at least, peak-RSS ratio at most or None): the issue's targets."""
    h = halokit_variant(fast)
    return {(h, "trl-default"): (3.0, None), (h, "trl-best"): (2.0, 0.7)}


def cells(quick: bool = False, fast: str = "bfloat16") -> list[Cell]:
    """Variable-length data: halokit and TRL's defaults and best on both shapes, plus float32 against float32 on
    body-heavy (where the backbone, not the LM head, dominates and the dtype matters most) when the fast dtype
    is bf16; fixed-length data: the main pair on both shapes. Fewer cells than the full cross product, so that
    `make bench` stays within ~40 minutes."""
    h = halokit_variant(fast)
    main = [h, "trl-best", "trl-default"]
    extra = ["halokit-fp32", "trl-fp32"] if fast == "bfloat16" else []
    if quick:
        return [Cell(METHOD, "head-heavy", "variable", [h, "trl-best"], fast)]
    return [Cell(METHOD, "head-heavy", "variable", main, fast), Cell(METHOD, "body-heavy", "variable", main + extra, fast)] + \
        [Cell(METHOD, shape, "fixed", [h, "trl-best"], fast) for shape in ("head-heavy", "body-heavy")]


def loss_equality(shapes: dict[str, dict]) -> list[dict]:
    """Step-0 loss (and z₀) of both sides on one batch, float32, at each benchmark shape."""
    return [dict(step0_losses(METHOD, shape), shape=name) for name, shape in shapes.items()]


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", METHOD, *sys.argv[1:]]))

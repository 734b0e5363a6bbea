"""The methods halokit trains with, what each needs, and KTO's class weights from the data.

``Method`` is the one dispatch table from a method name to its family (the kind of training step),
its pure loss function in :mod:`halokit.losses`, and its formula.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from halokit.losses import LossOutput

# ---------------------------------------------------------------- KTO's λ from the data


class KTOWeights(NamedTuple):
    desirable_weight: float
    undesirable_weight: float
    ratio: float  # λ_D·n_D / (λ_U·n_U) with these weights
    explanation: str


def kto_weights(
    n_desirable: int, n_undesirable: int, *, ratio_range: tuple[float, float] = (1.0, 4 / 3)
) -> KTOWeights:
    """λ_D, λ_U such that λ_D·n_D / (λ_U·n_U) lies in ``ratio_range`` (KTO paper, v1 Eq. 8).

    One weight stays 1; the other moves the ratio to the nearest end of the range (too few desirable
    examples raise λ_D, too many raise λ_U). A ratio already inside keeps both at 1.
    """
    for name, n in (("n_desirable", n_desirable), ("n_undesirable", n_undesirable)):
        if not n > 0:
            raise ValueError(f"{name} must be > 0 to weight KTO's two classes, got {n!r}")
    lo, hi = ratio_range
    if not 0 < lo <= hi < math.inf:
        raise ValueError(f"ratio_range must be (lo, hi) with 0 < lo <= hi < inf, got {ratio_range!r}")
    natural = n_desirable / n_undesirable
    desirable_weight = undesirable_weight = 1.0
    change = "both weights stay 1, which already puts"
    if natural < lo:
        desirable_weight = lo * n_undesirable / n_desirable
        change = f"desirable_weight={desirable_weight:.2f} puts"
    elif natural > hi:
        undesirable_weight = n_desirable / (hi * n_undesirable)
        change = f"undesirable_weight={undesirable_weight:.2f} puts"
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    explanation = (
        f"{n_desirable:,} desirable vs {n_undesirable:,} undesirable: {change} λ_D·n_D/(λ_U·n_U) "
        f"at {ratio:.2f}, inside [{lo:.3g}, {hi:.3g}] (KTO paper, Eq. 8)"
    )
    return KTOWeights(desirable_weight, undesirable_weight, ratio, explanation)


# ---------------------------------------------------------------- the methods the trainer offers


class Method(str, Enum):
    """A training method, named as in configs (``method: kto``).

    ``family`` is the kind of step that runs it; ``needs_*`` say what the data and setup must provide;
    ``uses_avg_logps``: the loss takes mean token log-probs ā instead of sums. ``loss_fn`` takes these
    positional arguments, then keyword hyper-parameters:

    * sft, unlearning: ``(policy_logps[, ref_logps])``, ref if ``needs_reference``
    * unpaired:        ``(policy_logps, ref_logps, is_desirable[, kl])``, kl if ``needs_kl_pairs``
    * paired:          ``(policy_chosen, policy_rejected[, ref_chosen, ref_rejected])``

    IdkDPO is in the paired family, but ``needs_pairs`` is False: the user brings forget data and
    halokit builds the pairs (chosen = an "I don't know" answer, rejected = the forget answer).
    """

    SFT = "sft"
    CSFT = "csft"
    KTO = "kto"
    APO_ZERO_UNPAIRED = "apo_zero_unpaired"
    DPO = "dpo"
    CDPO = "cdpo"
    IPO = "ipo"
    SLIC = "slic"
    SIMPO = "simpo"
    ORPO = "orpo"
    GA = "ga"
    GD = "gd"
    NPO = "npo"
    NPO_RT = "npo_rt"
    SIMNPO = "simnpo"
    IDK_DPO = "idk_dpo"

    def __str__(self) -> str:
        return self.value

    @property
    def family(self) -> str:
        """One of "sft", "unpaired", "paired", "unlearning"."""
        return _METHODS[self][0]

    @property
    def loss_fn(self) -> Callable[..., LossOutput]:
        """The pure loss function in :mod:`halokit.losses` (imported here, so that configs and the data
        commands do not import torch)."""
        return getattr(importlib.import_module("halokit.losses"), _METHODS[self][1])

    @property
    def formula(self) -> str:
        """The per-example loss in one line, for docs and reports."""
        return _METHODS[self][2]

    @property
    def needs_reference(self) -> bool:
        return self in _NEEDS_REFERENCE

    @property
    def needs_kl_pairs(self) -> bool:
        """Mismatched (x_i, y_{i+1}) pairs for KTO's z₀."""
        return self is Method.KTO

    @property
    def needs_pairs(self) -> bool:
        """The user's data must be (prompt, chosen, rejected) preference pairs."""
        return self in _NEEDS_PAIRS

    @property
    def needs_labels(self) -> bool:
        """Each example must carry a desirable/undesirable label."""
        return self in _NEEDS_LABELS

    @property
    def needs_forget(self) -> bool:
        return self in _NEEDS_FORGET

    @property
    def needs_retain(self) -> bool:
        return self in _NEEDS_RETAIN

    @property
    def uses_avg_logps(self) -> bool:
        return self in _USES_AVG_LOGPS


# The one dispatch table: method -> (family, name of its loss function in halokit.losses, formula). In the
# formulas r = log π/π_ref, h = log π_w/π_ref,w − log π_l/π_ref,l, ā = mean token log-prob, z₀ = KTO's
# reference point.
_METHODS: dict[Method, tuple[str, str, str]] = {
    Method.SFT: ("sft", "sft_loss", "−log π(y|x)"),
    Method.CSFT: ("sft", "sft_loss", "−log π(y|x) on desirable examples only"),
    Method.KTO: ("unpaired", "kto_loss", "desirable λ_D(1−σ(β(r−z₀))), undesirable λ_U(1−σ(β(z₀−r)))"),
    Method.APO_ZERO_UNPAIRED: ("unpaired", "apo_zero_unpaired_loss", "desirable 1−σ(β·r), undesirable σ(β·r)"),
    Method.DPO: ("paired", "dpo_loss", "−log σ(β·h)"),
    Method.CDPO: ("paired", "dpo_loss", "−(1−ε)·log σ(β·h) − ε·log σ(−β·h)"),
    Method.IPO: ("paired", "ipo_loss", "(h − 1/(2β))²"),
    Method.SLIC: ("paired", "slic_loss", "max(0, δ − (log π_w − log π_l)) + λ·nll_w"),
    Method.SIMPO: ("paired", "simpo_loss", "−log σ(β·(ā_w − ā_l) − γ)"),
    Method.ORPO: ("paired", "orpo_loss", "nll_w − λ·log σ(log odds_w − log odds_l), log odds = ā − log(1−e^ā)"),
    Method.GA: ("unlearning", "ga_loss", "+log π(y|x) on forget"),
    Method.GD: ("unlearning", "ga_loss", "+log π(y|x) on forget + nll on retain"),
    Method.NPO: ("unlearning", "npo_loss", "−(2/β)·log σ(−β·r) on forget"),
    Method.NPO_RT: ("unlearning", "npo_loss", "−(2/β)·log σ(−β·r) on forget + w·nll on retain"),
    Method.SIMNPO: ("unlearning", "simnpo_loss", "−(2/β)·log σ(−β·ā − γ) on forget + w·nll on retain"),
    Method.IDK_DPO: (
        "paired",
        "dpo_loss",
        "−log σ(β·h), chosen = “I don't know”, rejected = the forget answer",
    ),
}


def _methods(names: str) -> frozenset[Method]:
    return frozenset(Method(name) for name in names.split())


_NEEDS_REFERENCE = _methods("kto apo_zero_unpaired dpo cdpo ipo npo npo_rt idk_dpo")
_NEEDS_PAIRS = _methods("dpo cdpo ipo slic simpo orpo")
_NEEDS_LABELS = _methods("csft kto apo_zero_unpaired")
_NEEDS_FORGET = _methods("ga gd npo npo_rt simnpo idk_dpo")
_NEEDS_RETAIN = _methods("gd npo_rt simnpo")
_USES_AVG_LOGPS = _methods("simpo orpo simnpo")

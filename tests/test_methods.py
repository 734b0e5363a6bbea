"""Method table and KTO class weights (halokit.methods)."""

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from halokit.methods import Method, kto_weights

SETTINGS = settings(max_examples=50, deadline=None)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 2 == 0


# ---------------------------------------------------------------- KTO weights


def test_kto_weights_inside_range_keeps_both_at_one():
    """1000/900 ≈ 1.11 is inside [1, 4/3]."""
    weights = kto_weights(1000, 900)
    assert (weights.desirable_weight, weights.undesirable_weight) == (1.0, 1.0)
    assert_close(weights.ratio, 1000 / 900)


def test_kto_weights_scarce_desirable_raises_desirable_weight():
    """412 vs 3706: λ_D = 1·3706/412 ≈ 8.995 puts the ratio at the lower end, 1."""
    weights = kto_weights(412, 3706)
    assert weights.undesirable_weight == 1.0
    assert_close(weights.desirable_weight, 3706 / 412)
    assert_close(weights.ratio, 1.0)
    assert weights.explanation == (
        "412 desirable vs 3,706 undesirable: desirable_weight=9.00 puts λ_D·n_D/(λ_U·n_U) at 1.00, "
        "inside [1, 1.33] (KTO paper, Eq. 8)"
    )


def test_kto_weights_abundant_desirable_raises_undesirable_weight():
    """5000 vs 1000: λ_U = 5000/((4/3)·1000) = 3.75 puts the ratio at the upper end, 4/3."""
    weights = kto_weights(5000, 1000)
    assert weights.desirable_weight == 1.0
    assert_close(weights.undesirable_weight, 3.75)
    assert_close(weights.ratio, 4 / 3)
    assert "5,000 desirable vs 1,000 undesirable" in weights.explanation
    assert "undesirable_weight=3.75" in weights.explanation


@SETTINGS
@given(
    n_desirable=st.integers(1, 10**6),
    n_undesirable=st.integers(1, 10**6),
    lo=st.floats(0.25, 4),
    width=st.floats(0, 2),
)
def test_kto_weights_land_on_nearest_end_of_range(n_desirable, n_undesirable, lo, width):
    """One weight is 1 and both are ≥ 1; the ratio lands in [lo, hi], on the end nearest the natural ratio."""
    hi = lo + width
    weights = kto_weights(n_desirable, n_undesirable, ratio_range=(lo, hi))
    natural = n_desirable / n_undesirable
    assert 1.0 in (weights.desirable_weight, weights.undesirable_weight)
    assert min(weights.desirable_weight, weights.undesirable_weight) >= 1.0
    assert lo * (1 - 1e-12) <= weights.ratio <= hi * (1 + 1e-12)
    expected = lo if natural < lo else hi if natural > hi else natural
    assert math.isclose(weights.ratio, expected, rel_tol=1e-12)
    assert f"{n_desirable:,} desirable vs {n_undesirable:,} undesirable" in weights.explanation


@pytest.mark.parametrize(
    "n_desirable, n_undesirable, ratio_range",
    [(0, 10, (1, 4 / 3)), (10, -1, (1, 4 / 3)), (10, 10, (0.0, 1.0)), (10, 10, (2.0, 1.0)),
     (10, 10, (1.0, math.inf)), (10, 10, (math.nan, 1.0))],
)  # fmt: skip
def test_kto_weights_rejects_bad_counts_and_ranges(n_desirable, n_undesirable, ratio_range):
    with pytest.raises(ValueError, match="must be"):
        kto_weights(n_desirable, n_undesirable, ratio_range=ratio_range)


# ---------------------------------------------------------------- Method


def test_method_lists_every_method_the_trainer_offers():
    names = "sft csft kto apo_zero_unpaired dpo cdpo ipo slic simpo orpo ga gd npo npo_rt simnpo idk_dpo"
    assert {m.value for m in Method} == set(names.split())
    assert Method("kto") is Method.KTO and str(Method.NPO_RT) == "npo_rt" and f"{Method.DPO}" == "dpo"


def test_method_needs_match_the_design_table():
    """DESIGN.md's "needs" column, method by method."""
    expected = {
        "needs_reference": "kto apo_zero_unpaired dpo cdpo ipo npo npo_rt idk_dpo",
        "needs_kl_pairs": "kto",
        "needs_pairs": "dpo cdpo ipo slic simpo orpo",
        "needs_labels": "csft kto apo_zero_unpaired",
        "needs_forget": "ga gd npo npo_rt simnpo idk_dpo",
        "needs_retain": "gd npo_rt simnpo",
        "uses_avg_logps": "simpo orpo simnpo",
    }
    for prop, names in expected.items():
        assert {m.value for m in Method if getattr(m, prop)} == set(names.split()), prop
    families = {m.value: m.family for m in Method}
    assert families == {
        **dict.fromkeys(["sft", "csft"], "sft"),
        **dict.fromkeys(["kto", "apo_zero_unpaired"], "unpaired"),
        **dict.fromkeys(["dpo", "cdpo", "ipo", "slic", "simpo", "orpo", "idk_dpo"], "paired"),
        **dict.fromkeys(["ga", "gd", "npo", "npo_rt", "simnpo"], "unlearning"),
    }


@pytest.mark.parametrize("method", list(Method))
def test_method_properties_are_consistent(method):
    assert callable(method.loss_fn) and method.formula.strip()
    assert method.family in {"sft", "unpaired", "paired", "unlearning"}
    if method.needs_kl_pairs:
        assert method.needs_reference and method.needs_labels and method.family == "unpaired"
    if method.needs_pairs:
        assert method.family == "paired" and not method.needs_forget
    if method.family == "unpaired":
        assert method.needs_labels
    if method.family == "unlearning" or method.needs_retain:
        assert method.needs_forget
    # the loss's first argument is named *_avg_logps exactly when the method uses average log-probs
    first = next(iter(inspect.signature(method.loss_fn).parameters))
    assert ("avg" in first) == method.uses_avg_logps


@pytest.mark.parametrize("method", list(Method))
def test_method_loss_fn_follows_the_documented_calling_convention(method):
    """The positional arguments derived from family, needs_reference and needs_kl_pairs are exactly what
    loss_fn takes (a missing or extra positional argument would raise TypeError)."""
    logps = [t(-1.0, -2.0, -3.0) for _ in range(4)]
    if method.family == "paired":
        args = logps[:4] if method.needs_reference else logps[:2]
    elif method.family == "unpaired":
        args = [*logps[:2], labels(3)] + ([0.1] if method.needs_kl_pairs else [])
    else:
        args = logps[:2] if method.needs_reference else logps[:1]
    out = method.loss_fn(*args)
    assert out.losses.shape == (3,)

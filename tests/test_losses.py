"""Closed forms, gradients and properties of every objective in halokit.losses, in float64.

Notation: σ(x) = 1/(1 + e^{−x}), log σ(x) = −log(1 + e^{−x}), σ'(x) = σ(x)·σ(−x), σ(0) = 1/2,
σ(ln 3) = 3/4. r = policy − ref; h = (π_w − π_l) − (ref_w − ref_l), all in log space.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from halokit.losses import (
    LossOutput,
    apo_zero_unpaired_loss,
    clamp_kl,
    dpo_loss,
    ga_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    npo_loss,
    orpo_loss,
    sft_loss,
    simnpo_loss,
    simpo_loss,
    slic_loss,
)

SETTINGS = settings(max_examples=50, deadline=None)
LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def zeros(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 2 == 0  # desirable, undesirable, desirable, …


# name -> (loss as a function of n log-prob tensors, n, rewards are paired). Hyper-parameters are
# away from defaults so that a formula that ignores one of them fails somewhere.
CASES = {
    "kto": (
        lambda p, r: kto_loss(
            p, r, labels(len(p)), 0.3, beta=0.5, desirable_weight=1.5, undesirable_weight=0.7
        ),
        2,
        False,
    ),
    "apo_zero_unpaired": (lambda p, r: apo_zero_unpaired_loss(p, r, labels(len(p)), beta=0.5), 2, False),
    "dpo": (lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.5, label_smoothing=0.1), 4, True),
    "ipo": (lambda a, b, c, d: ipo_loss(a, b, c, d, beta=0.5), 4, True),
    "slic": (lambda a, b: slic_loss(a, b, delta=0.7), 2, True),
    "simpo": (lambda a, b: simpo_loss(a, b, beta=1.5, gamma=0.3), 2, True),
    "orpo": (lambda a, b: orpo_loss(a, b, lam=0.2), 2, True),
    "sft": (sft_loss, 1, False),
    "ga": (ga_loss, 1, False),
    "npo": (lambda p, r: npo_loss(p, r, beta=0.5), 2, False),
    "simnpo": (lambda p: simnpo_loss(p, beta=1.5, gamma=0.2), 1, False),
}


# ---------------------------------------------------------------- DPO, cDPO, IPO


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_dpo_is_log2_when_policy_equals_reference(beta):
    """h = 0 → −log σ(0) = log 2, whatever β."""
    out = dpo_loss(t(-3.0), t(-5.0), t(-3.0), t(-5.0), beta=beta)
    assert_close(out.losses, t(LN2))


def test_dpo_at_beta_h_one():
    """β = 0.5, h = (−1 − (−4)) − (−2 − (−3)) = 3 − 1 = 2, so β·h = 1 → −log σ(1) = log(1 + e^{−1}) ≈ 0.313262."""
    out = dpo_loss(t(-1.0), t(-4.0), t(-2.0), t(-3.0), beta=0.5)
    assert_close(out.losses, t(math.log1p(math.exp(-1.0))))
    # rewards: β·(π − ref) = [0.5·1, 0.5·(−1)]
    assert_close(out.rewards, t(0.5, -0.5).reshape(2, 1))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_gradient_at_h_zero(beta):
    """∂/∂π_w [−log σ(β·h)] = −β·σ(−β·h) = −β/2 at h = 0; ∂/∂π_l = +β/2."""
    chosen, rejected = t(-2.0, grad=True), t(-2.0, grad=True)
    dpo_loss(chosen, rejected, t(-2.0), t(-2.0), beta=beta).losses.sum().backward()
    assert_close(chosen.grad, t(-beta / 2))
    assert_close(rejected.grad, t(beta / 2))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_closed_form(eps):
    """β = 1, h = ln 3: σ(ln 3) = 3/4, σ(−ln 3) = 1/4, so
    loss = −(1 − ε)·log(3/4) − ε·log(1/4) = (1 − ε)·ln(4/3) + ε·ln 4."""
    out = dpo_loss(t(LN3), zeros(), zeros(), zeros(), beta=1.0, label_smoothing=eps)
    assert_close(out.losses, t((1 - eps) * math.log(4 / 3) + eps * math.log(4.0)))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_closed_forms(beta):
    """(h − 1/(2β))² is 0 at h = 1/(2β) and 1/(4β²) at h = 0."""
    target = 1 / (2 * beta)
    assert_close(ipo_loss(t(target), zeros(), zeros(), zeros(), beta=beta).losses, t(0.0))
    assert_close(ipo_loss(zeros(), zeros(), zeros(), zeros(), beta=beta).losses, t(1 / (4 * beta**2)))


def test_slic_hinge():
    """δ = 1: margins 0.25 and 2 give max(0, 0.75) = 0.75 and max(0, −1) = 0; past δ the gradient is 0."""
    chosen = t(-1.0, 0.0, grad=True)
    out = slic_loss(chosen, t(-1.25, -2.0), delta=1.0)
    assert_close(out.losses, t(0.75, 0.0))
    out.losses.sum().backward()
    assert_close(chosen.grad, t(-1.0, 0.0))


# ---------------------------------------------------------------- SimPO, ORPO


def test_simpo_hand_values():
    """β = 2, γ = 0.5. ā_w − ā_l = 0.5: 2·0.5 − 0.5 = 0.5 → log(1 + e^{−0.5}) ≈ 0.474077.
    ā_w − ā_l = γ/β = 0.25: argument 0 → log 2. Rewards β·ā."""
    out = simpo_loss(t(-1.0, -1.0), t(-1.5, -1.25), beta=2.0, gamma=0.5)
    assert_close(out.losses, t(math.log1p(math.exp(-0.5)), LN2))
    assert_close(out.rewards, t(-2.0, -2.0, -3.0, -2.5).reshape(2, 2))


def test_orpo_hand_values():
    """p_w = 1/2: odds 1, log odds 0. p_l = 1/5: odds (1/5)/(4/5) = 1/4, log odds −ln 4.
    λ = 0.1: 0.1·(−log σ(ln 4)) = 0.1·(−log(4/5)) = 0.1·ln(5/4) ≈ 0.0223144."""
    out = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), lam=0.1)
    assert_close(out.losses, t(0.1 * math.log(1.25)))
    assert_close(out.rewards, t(0.0, -math.log(4.0)).reshape(2, 1))


def test_orpo_log_odds_accurate_on_both_sides_of_minus_log2():
    """log odds(ā) = ā − log(1 − e^ā). At ā = −1e-8 (clamped to −1e-6): −1e-6 − log(−expm1(−1e-6)).
    At ā = −50: 1 − e^{−50} rounds to 1, so log odds = −50. Both branches of log1mexp, no rounding to 0/inf."""
    out = orpo_loss(t(-1e-8, -50.0, -0.5), t(-50.0, -1e-8, -1.0), lam=1.0)
    near_one = -1e-6 - math.log(-math.expm1(-1e-6))
    assert_close(out.rewards[:, :2], t(near_one, -50.0, -50.0, near_one).reshape(2, 2))
    mid = [a - math.log(-math.expm1(a)) for a in (-0.5, -1.0)]
    assert_close(out.rewards[:, 2], t(*mid))


# ---------------------------------------------------------------- KTO, APO-zero


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_kto_is_half_weight_when_r_equals_kl(beta):
    """r = z₀ → λ·(1 − σ(0)) = λ/2 for both labels."""
    out = kto_loss(t(-1.0, -1.0), t(-1.3, -1.3), torch.tensor([True, False]), 0.3, beta=beta,
                   desirable_weight=2.0, undesirable_weight=0.5)  # fmt: skip
    assert_close(out.losses, t(1.0, 0.25))


def test_kto_hand_values():
    """β = 0.5, r = 2, z₀ = 0: desirable 1 − σ(1) = σ(−1) ≈ 0.268941, undesirable 1 − σ(−1) = σ(1) ≈ 0.731059.
    Rewards β·r = 1."""
    out = kto_loss(t(2.0, 2.0), zeros(2), torch.tensor([True, False]), 0.0, beta=0.5)
    assert_close(out.losses, t(0.2689414213699951, 0.7310585786300049))
    assert_close(out.rewards, t(1.0, 1.0))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_kto_gradient_at_r_equals_kl(beta):
    """∂/∂π [λ_D·σ(β(z₀ − r))] = −β·λ_D·σ'(0) = −β·λ_D/4; undesirable: +β·λ_U/4."""
    policy = t(0.2, 0.2, grad=True)
    out = kto_loss(policy, zeros(2), torch.tensor([True, False]), 0.2, beta=beta,
                   desirable_weight=3.0, undesirable_weight=0.5)  # fmt: skip
    out.losses.sum().backward()
    assert_close(policy.grad, t(-beta * 3.0 / 4, beta * 0.5 / 4))


def test_kto_no_gradient_reaches_kl():
    """z₀ is a constant in the paper: a kl that requires grad is detached, its .grad stays None."""
    kl = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    policy = t(-1.0, -2.0, grad=True)
    kto_loss(policy, t(-1.5, -1.5), torch.tensor([True, False]), kl).losses.sum().backward()
    assert kl.grad is None
    assert policy.grad is not None


def test_kto_kl_estimate_clamps_and_detaches():
    """mean(π − ref) over mismatched pairs: (0.5 + 1.5)/2 = 1; (−0.5 − 1.5)/2 = −1 → clamped to 0."""
    policy = t(-1.0, -2.0, grad=True)
    estimate = kto_kl_estimate(policy, t(-1.5, -3.5))
    assert_close(estimate, torch.tensor(1.0, dtype=torch.float64))
    assert not estimate.requires_grad and estimate.shape == ()
    assert_close(kto_kl_estimate(t(-1.5, -3.5), policy), torch.tensor(0.0, dtype=torch.float64))


def test_clamp_kl_after_cross_rank_average_differs_from_clamping_per_rank():
    """Ranks with mean log-ratios +1 and −3: average then clamp = max(0, −1) = 0, while clamping per rank
    and then averaging gives (1 + 0)/2 = 0.5 — why the caller all-reduces before clamp_kl."""
    per_rank = t(1.0, -3.0, grad=True)
    assert_close(clamp_kl(per_rank.mean()), torch.tensor(0.0, dtype=torch.float64))
    assert not clamp_kl(per_rank.mean()).requires_grad
    assert_close(per_rank.detach().clamp(min=0).mean(), torch.tensor(0.5, dtype=torch.float64))


def test_apo_zero_closed_forms():
    """r = 0: 1 − σ(0) = σ(0) = 1/2. β = 1, r = ln 3: desirable 1 − 3/4 = 1/4, undesirable 3/4."""
    both = torch.tensor([True, False])
    assert_close(apo_zero_unpaired_loss(zeros(2), zeros(2), both, beta=0.3).losses, t(0.5, 0.5))
    assert_close(apo_zero_unpaired_loss(t(LN3, LN3), zeros(2), both, beta=1.0).losses, t(0.25, 0.75))


# ---------------------------------------------------------------- SFT, GA, NPO, SimNPO


def test_sft_and_ga():
    """SFT is −log π, GA is +log π; both have gradient ∓1 per example."""
    policy = t(-2.0, -0.5, grad=True)
    assert_close(sft_loss(policy).losses, t(2.0, 0.5))
    ga_loss(policy).losses.sum().backward()
    assert_close(policy.grad, t(1.0, 1.0))


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 4.0])
def test_npo_at_r_zero(beta):
    """r = 0: −(2/β)·log σ(0) = (2/β)·ln 2. ∂/∂π = 2σ(β·r) = 1, exactly gradient ascent's."""
    policy = t(-3.0, grad=True)
    out = npo_loss(policy, t(-3.0), beta=beta)
    assert_close(out.losses, t(2 / beta * LN2))
    out.losses.sum().backward()
    assert_close(policy.grad, t(1.0))


def test_npo_hand_value():
    """β = 1, r = ln 3: −2·log σ(−ln 3) = −2·log(1/4) = 2·ln 4."""
    assert_close(npo_loss(t(LN3), zeros(), beta=1.0).losses, t(2 * math.log(4.0)))


def test_npo_approaches_gradient_ascent_as_beta_goes_to_zero():
    """(2/β)·log(1 + e^{βr}) = (2/β)·ln 2 + r + β·r²/4 + O(β³): minus the constant it is r (GA's loss) up to
    β·r²/4 ≈ 1e-5 here, and its gradient 2σ(βr) tends to 1."""
    beta, r = 1e-4, t(-0.7, 0.3, 0.9)
    policy = r.clone().requires_grad_(True)
    out = npo_loss(policy, zeros(3), beta=beta)
    assert_close(out.losses - 2 / beta * LN2, r, atol=1e-4, rtol=0)
    out.losses.sum().backward()
    assert_close(policy.grad, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)


def test_simnpo_hand_values():
    """β = 2.5, γ = 0, ā = 0: (2/2.5)·ln 2 = 0.8·ln 2. β = 1, γ = ln 3, ā = 0: −2·log σ(−ln 3) = 2·ln 4.
    Rewards β·ā."""
    assert_close(simnpo_loss(zeros(), beta=2.5).losses, t(0.8 * LN2))
    out = simnpo_loss(t(0.0), beta=1.0, gamma=LN3)
    assert_close(out.losses, t(2 * math.log(4.0)))
    assert_close(simnpo_loss(t(-2.0), beta=2.5).rewards, t(-5.0))


# ---------------------------------------------------------------- every loss: gradcheck, shapes, validation


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name):
    """Analytic gradients match finite differences (float64, log-probs in (−6, −0.1), away from SLiC's kink)."""
    fn, n, _ = CASES[name]
    generator = torch.Generator().manual_seed(0)
    inputs = [
        (-0.1 - 5.9 * torch.rand(5, generator=generator, dtype=torch.float64)).requires_grad_(True)
        for _ in range(n)
    ]
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs).losses, inputs)


@pytest.mark.parametrize("name", CASES)
def test_output_shapes_and_rewards_detached(name):
    """losses (B,); rewards (2, B) for paired losses, (B,) otherwise; rewards carry no graph."""
    fn, n, paired = CASES[name]
    out = fn(*[t(-1.0, -2.0, -3.0, grad=True) for _ in range(n)])
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (3,) and out.losses.requires_grad
    assert out.rewards.shape == ((2, 3) if paired else (3,))
    assert not out.rewards.requires_grad


LOGP = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
@SETTINGS
@given(rows=st.lists(st.tuples(LOGP, LOGP, LOGP, LOGP), min_size=1, max_size=6))
def test_finite_losses_and_gradients_at_extremes(name, dtype, rows):
    """Log-probs anywhere in [−1e4, 1e4] (ORPO: ā in [−1e4, 0]) give finite losses and gradients, also in
    bfloat16, where e^ā rounds to 1 for ā > −2e-3 and a naive log1mexp puts NaN in ORPO's gradient."""
    fn, n, _ = CASES[name]
    columns = torch.tensor(rows, dtype=dtype).T[:n]
    if name == "orpo":
        columns = -columns.abs()
    inputs = [column.clone().requires_grad_(True) for column in columns]
    out = fn(*inputs)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


BAD_HYPERPARAMETERS = [
    (lambda: kto_loss(zeros(), zeros(), torch.tensor([True]), 0.0, beta=0.0), "beta"),
    (lambda: kto_loss(zeros(), zeros(), torch.tensor([True]), 0.0, beta=math.nan), "beta"),
    (
        lambda: kto_loss(zeros(), zeros(), torch.tensor([True]), 0.0, desirable_weight=-1.0),
        "desirable_weight",
    ),
    (
        lambda: kto_loss(zeros(), zeros(), torch.tensor([True]), 0.0, undesirable_weight=-1.0),
        "undesirable_weight",
    ),
    (lambda: apo_zero_unpaired_loss(zeros(), zeros(), torch.tensor([True]), beta=-0.1), "beta"),
    (lambda: dpo_loss(zeros(), zeros(), zeros(), zeros(), beta=0.0), "beta"),
    (lambda: dpo_loss(zeros(), zeros(), zeros(), zeros(), label_smoothing=0.5), "label_smoothing"),
    (lambda: dpo_loss(zeros(), zeros(), zeros(), zeros(), label_smoothing=-0.1), "label_smoothing"),
    (lambda: ipo_loss(zeros(), zeros(), zeros(), zeros(), beta=0.0), "beta"),
    (lambda: slic_loss(zeros(), zeros(), delta=0.0), "delta"),
    (lambda: simpo_loss(zeros(), zeros(), beta=0.0), "beta"),
    (lambda: simpo_loss(zeros(), zeros(), gamma=-1.0), "gamma"),
    (lambda: orpo_loss(zeros(), zeros(), lam=0.0), "lam"),
    (lambda: npo_loss(zeros(), zeros(), beta=0.0), "beta"),
    (lambda: simnpo_loss(zeros(), beta=-1.0), "beta"),
    (lambda: simnpo_loss(zeros(), gamma=-0.5), "gamma"),
    (lambda: dpo_loss(zeros(2), zeros(2), zeros(2), zeros(2).unsqueeze(1)), "shape"),
    (lambda: npo_loss(zeros(2), zeros(3)), "shape"),
    (lambda: kto_loss(zeros(2), zeros(2), torch.tensor([1, 0]), 0.0), "bool"),
    (lambda: kto_loss(zeros(2), zeros(2), torch.tensor([True]), 0.0), "shape"),
]


@pytest.mark.parametrize("call, word", BAD_HYPERPARAMETERS)
def test_bad_arguments_raise_clear_errors(call, word):
    with pytest.raises(ValueError, match=word):
        call()


# ---------------------------------------------------------------- properties


@SETTINGS
@given(r=st.floats(-50, 50), step=st.floats(0, 10), kl=st.floats(0, 5), beta=st.floats(0.01, 5))
def test_kto_desirable_loss_falls_and_undesirable_rises_with_r(r, step, kl, beta):
    """∂/∂r of λ_D·σ(β(z₀ − r)) is ≤ 0 and of λ_U·σ(β(r − z₀)) is ≥ 0, so r → r + step moves them so."""
    both = torch.tensor([True, False])
    low = kto_loss(t(r, r), zeros(2), both, kl, beta=beta).losses
    high = kto_loss(t(r + step, r + step), zeros(2), both, kl, beta=beta).losses
    assert high[0] <= low[0] and high[1] >= low[1]


@SETTINGS
@given(
    logps=st.tuples(*[st.floats(-100, 0)] * 4),
    step=st.floats(0, 10),
    beta=st.floats(0.01, 5),
    eps=st.floats(0, 0.49),
)
def test_dpo_loss_falls_as_chosen_logp_rises(logps, step, beta, eps):
    """With ε < 1/2, ∂loss/∂(βh) = −(1 − ε)·σ(−βh) + ε·σ(βh) < 0 for βh < log((1 − ε)/ε): raising log π_w
    lowers the loss at least up to the cDPO optimum, and for ε = 0 always. Checked where that holds."""
    policy_w, policy_l, ref_w, ref_l = logps
    low = dpo_loss(t(policy_w), t(policy_l), t(ref_w), t(ref_l), beta=beta, label_smoothing=eps).losses
    high = dpo_loss(
        t(policy_w + step), t(policy_l), t(ref_w), t(ref_l), beta=beta, label_smoothing=eps
    ).losses
    h_high = (policy_w + step - policy_l) - (ref_w - ref_l)
    if eps == 0 or beta * h_high <= math.log((1 - eps) / eps):
        assert high[0] <= low[0] + 1e-12

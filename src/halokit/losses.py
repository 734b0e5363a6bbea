"""Per-example objectives for alignment (KTO, DPO and friends) and unlearning (NPO and friends).

Every loss is a pure function of sequence log-probs (B,) and floats, returning
``LossOutput(losses, rewards)``: ``losses`` (B,) per example, not reduced (the step reduces), and
``rewards``, detached diagnostics for logging, of shape (B,) for unpaired, SFT and unlearning
losses and (2, B) = stacked ``[chosen, rejected]`` for paired ones (so ``rewards[0] - rewards[1]``
is the margin). Log-probs are summed over completion tokens, except arguments named
``*_avg_logps`` (mean token log-prob ā); r = policy_logps − ref_logps = log π/π_ref.
Hyper-parameters are keyword-only and validated. Nothing here reads a config, calls a model or
talks to another process.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LossOutput(NamedTuple):
    losses: Tensor  # (B,) per example, not reduced
    rewards: Tensor  # (B,), or (2, B) = [chosen, rejected] for paired losses; detached


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_same_shape(*tensors: Tensor) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) > 1:
        raise ValueError(f"log-probs (and is_desirable) must share one shape (B,), got shapes {shapes}")


def _check_unpaired(policy_logps: Tensor, ref_logps: Tensor, is_desirable: Tensor) -> None:
    _check_same_shape(policy_logps, ref_logps, is_desirable)
    if is_desirable.dtype != torch.bool:
        raise ValueError(f"is_desirable must be a bool tensor, got dtype {is_desirable.dtype}")


# ---------------------------------------------------------------- unpaired (KTO family)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    is_desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306, Sec. 4), with reference point z₀ = ``kl``:

        desirable:   λ_D · (1 − σ(β·(r − z₀)))
        undesirable: λ_U · (1 − σ(β·(z₀ − r)))

    ``kl`` is a scalar tensor or float (see ``kto_kl_estimate``); it is detached here because the
    paper treats z₀ as a constant. Shapes: policy_logps, ref_logps, is_desirable (bool) (B,);
    kl (). Returns losses (B,), rewards β·r (B,).
    """
    _check_positive("beta", beta)
    _check_nonnegative("desirable_weight", desirable_weight)
    _check_nonnegative("undesirable_weight", undesirable_weight)
    _check_unpaired(policy_logps, ref_logps, is_desirable)
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    logratio = policy_logps - ref_logps  # (B,)
    # 1 − σ(x) = σ(−x)
    desirable = desirable_weight * torch.sigmoid(beta * (kl - logratio))
    undesirable = undesirable_weight * torch.sigmoid(beta * (logratio - kl))
    return LossOutput(torch.where(is_desirable, desirable, undesirable), (beta * logratio).detach())


def clamp_kl(mean_logratio: Tensor) -> Tensor:
    """KTO's z₀ = max(0, mean log-ratio on mismatched pairs), detached.

    With several processes, all-reduce (average) the *un-clamped* ``(kl_policy_logps −
    kl_ref_logps).mean()`` first, then call this: clamping per rank and then averaging biases z₀ up.
    """
    return mean_logratio.detach().clamp(min=0.0)


def kto_kl_estimate(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """Single-process z₀ for ``kto_loss``: max(0, mean(kl_policy_logps − kl_ref_logps)), detached.

    Inputs (B,) are log-probs of mismatched pairs (x_i, y_{i+1}) under the policy and the reference
    (arXiv 2402.01306, Sec. 4). Returns a scalar (). Across processes, see ``clamp_kl``.
    """
    _check_same_shape(kl_policy_logps, kl_ref_logps)
    return clamp_kl((kl_policy_logps - kl_ref_logps).mean())


def apo_zero_unpaired_loss(
    policy_logps: Tensor, ref_logps: Tensor, is_desirable: Tensor, *, beta: float = 0.1
) -> LossOutput:
    """Unpaired APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266), KTO without z₀:

        desirable: 1 − σ(β·r);   undesirable: σ(β·r)

    Shapes: inputs (B,), is_desirable bool. Returns losses (B,), rewards β·r (B,).
    """
    _check_positive("beta", beta)
    _check_unpaired(policy_logps, ref_logps, is_desirable)
    logratio = policy_logps - ref_logps  # (B,)
    losses = torch.where(is_desirable, torch.sigmoid(-beta * logratio), torch.sigmoid(beta * logratio))
    return LossOutput(losses, (beta * logratio).detach())


# ---------------------------------------------------------------- paired (DPO family)


def _paired_rewards(chosen: Tensor, rejected: Tensor) -> Tensor:
    return torch.stack([chosen, rejected]).detach()  # (2, B)


def _logratios(*logps: Tensor) -> tuple[Tensor, Tensor]:
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> chosen and rejected log π/π_ref."""
    _check_same_shape(*logps)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected  # (B,), (B,)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7); cDPO when label_smoothing ε > 0.

        h = (log π_w − log π_l) − (log π_ref,w − log π_ref,l)
        loss = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    cDPO (Mitchell 2023, "A note on DPO with noisy preferences") assumes each label is flipped with
    probability ε, so 0 ≤ ε < 0.5. IdkDPO is this loss with chosen = an "I don't know" answer.
    Shapes: inputs (B,). Returns losses (B,), rewards (2, B) = β·r for [chosen, rejected].
    """
    _check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)  # β·h, (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, _paired_rewards(beta * chosen, beta * rejected))


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17, τ = beta): loss = (h − 1/(2β))², h as in DPO.

    Shapes: inputs (B,). Returns losses (B,), rewards (2, B) = β·r for [chosen, rejected].
    """
    _check_positive("beta", beta)
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return LossOutput(losses, _paired_rewards(beta * chosen, beta * rejected))


def slic_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, delta: float = 1.0
) -> LossOutput:
    """SLiC-HF calibration (Zhao et al. 2023, arXiv 2305.10425): max(0, δ − (log π_w − log π_l)).

    No reference. The NLL regulariser on the chosen answer is added in the training step.
    Shapes: inputs (B,). Returns losses (B,), rewards (2, B) = [log π_w, log π_l].
    """
    _check_positive("delta", delta)
    _check_same_shape(policy_chosen_logps, policy_rejected_logps)
    losses = torch.relu(delta - (policy_chosen_logps - policy_rejected_logps))
    return LossOutput(losses, _paired_rewards(policy_chosen_logps, policy_rejected_logps))


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): −log σ(β·(ā_w − ā_l) − γ). No reference.

    Shapes: inputs (B,). Returns losses (B,), rewards (2, B) = β·[ā_w, ā_l].
    """
    _check_positive("beta", beta)
    _check_nonnegative("gamma", gamma)
    _check_same_shape(policy_chosen_avg_logps, policy_rejected_avg_logps)
    chosen, rejected = beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps  # (B,), (B,)
    return LossOutput(-F.logsigmoid(chosen - rejected - gamma), _paired_rewards(chosen, rejected))


# The odds are infinite at ā = 0 (p = 1), so ā is clamped to at most −1e-6 (p = 1 − 1e-6); the
# clamp's zero gradient only touches completions the model already predicts with certainty.
_ORPO_MAX_AVG_LOGP = -1e-6


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 − exp(a)) for a < 0, accurate on both sides of −log 2 (Mächler 2012).

    Each branch only sees inputs where it is finite, so the unused one cannot put NaN in the gradient.
    """
    cut = torch.full_like(a, -math.log(2.0))
    near_zero = a > cut
    a_hi = torch.where(near_zero, a, cut)  # ≥ −log 2: −expm1 is in (0, 1/2]
    a_lo = torch.where(near_zero, cut, a)  # ≤ −log 2: −exp is in [−1/2, 0)
    return torch.where(near_zero, torch.log(-torch.expm1(a_hi)), torch.log1p(-torch.exp(a_lo)))


def orpo_loss(
    policy_chosen_avg_logps: Tensor, policy_rejected_avg_logps: Tensor, *, lam: float = 0.1
) -> LossOutput:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv 2403.07691): −λ·log σ(log odds_w − log odds_l).

    log odds(ā) = log(p / (1 − p)) with p = exp(ā), i.e. ā − log(1 − exp(ā)), computed stably; ā is
    clamped to ≤ −1e-6. No reference. The NLL term on the chosen answer is added in the step.
    Shapes: inputs (B,). Returns losses (B,), rewards (2, B) = [log odds_w, log odds_l] (their
    difference is the log odds ratio).
    """
    _check_positive("lam", lam)
    _check_same_shape(policy_chosen_avg_logps, policy_rejected_avg_logps)
    chosen = policy_chosen_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP)
    rejected = policy_rejected_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds_chosen, log_odds_rejected = chosen - _log1mexp(chosen), rejected - _log1mexp(rejected)
    losses = -lam * F.logsigmoid(log_odds_chosen - log_odds_rejected)
    return LossOutput(losses, _paired_rewards(log_odds_chosen, log_odds_rejected))


# ---------------------------------------------------------------- SFT and unlearning


def sft_loss(policy_logps: Tensor) -> LossOutput:
    """Supervised fine-tuning: −log π(y|x). Shapes: (B,) -> losses (B,), rewards log π (B,)."""
    return LossOutput(-policy_logps, policy_logps.detach())


def ga_loss(policy_logps: Tensor) -> LossOutput:
    """Gradient ascent on forget data: +log π(y|x), so minimizing it pushes log π down.

    Shapes: (B,) -> losses (B,), rewards log π (B,).
    """
    return LossOutput(policy_logps, policy_logps.detach())


def npo_loss(policy_logps: Tensor, ref_logps: Tensor, *, beta: float = 0.1) -> LossOutput:
    """NPO (Zhang et al. 2024, arXiv 2404.05868, Eq. 3) on forget data:

        loss = −(2/β)·log σ(−β·r) = (2/β)·log(1 + (π/π_ref)^β)

    ∂loss/∂r = 2σ(β·r), which is 1 at r = 0 for every β (gradient ascent's); as β → 0 the loss
    tends to (2/β)·log 2 + r. Shapes: inputs (B,). Returns losses (B,), rewards β·r (B,).
    """
    _check_positive("beta", beta)
    _check_same_shape(policy_logps, ref_logps)
    logratio = policy_logps - ref_logps  # (B,)
    return LossOutput(-(2 / beta) * F.logsigmoid(-beta * logratio), (beta * logratio).detach())


def simnpo_loss(policy_avg_logps: Tensor, *, beta: float = 2.5, gamma: float = 0.0) -> LossOutput:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163) on forget data, NPO without a reference:

        loss = −(2/β)·log σ(−β·ā − γ)

    The retain NLL term is added in the step. Shapes: (B,) -> losses (B,), rewards β·ā (B,).
    """
    _check_positive("beta", beta)
    _check_nonnegative("gamma", gamma)
    losses = -(2 / beta) * F.logsigmoid(-beta * policy_avg_logps - gamma)
    return LossOutput(losses, (beta * policy_avg_logps).detach())

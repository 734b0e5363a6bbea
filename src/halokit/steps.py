"""One training step per method family: ``step(policy, batch, reference) -> (loss, metrics)``.

``policy`` maps a :class:`~halokit.data.collate.SeqBatch` to summed completion log-probs
(:class:`~halokit.logprobs.LogpsModel`, possibly DDP-wrapped); ``reference`` is a
:class:`~halokit.reference.Reference` or None. Losses come from :mod:`halokit.losses` and are reduced
here: the mean over the micro-batch's examples; NLL terms (SFT, the retain term, SLiC/ORPO's
regulariser) are the mean over completion tokens, as in ordinary language-model training.

Metrics use TRL's familiar names and are returned as ``{name: tensor([sum, count])}`` so that the
loop can average them over a logging window and across processes without a sync per step.

KTO's reference point z₀ (arXiv 2402.01306 §4.2) is the only cross-process quantity: the mean
log-ratio over the micro-batch's KL pairs is averaged across processes by ``reduce_mean`` *before*
the clamp at 0, under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from halokit.data.collate import Batch
from halokit.losses import apo_zero_unpaired_loss, clamp_kl, kto_loss
from halokit.methods import Method

Metrics = dict[str, Tensor]
StepFn = Callable[[Any, Batch, Any], tuple[Tensor, Metrics]]


def stat(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """``tensor([sum, count])`` of ``values`` (where ``mask``), detached, float32."""
    values = values.detach().float()
    if mask is not None:
        values = values[mask]
    return torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])


def token_mean_nll(logps) -> Tensor:
    """−Σ log p / Σ tokens over a SequenceLogps: the usual language-modelling loss."""
    return -logps.sums.sum() / logps.counts.sum().clamp(min=1)


def sft_step(policy, batch: Batch, reference=None) -> tuple[Tensor, Metrics]:
    """SFT and CSFT (CSFT's data is the desirable examples only): token-mean NLL of the completions."""
    logps = policy(batch.policy)
    loss = token_mean_nll(logps)
    return loss, {"loss": stat(loss), "logps/chosen": stat(logps.sums)}


def unpaired_step(policy, batch: Batch, reference, *, method: Method, loss_kwargs: dict,
                  reduce_mean: Callable[[Tensor], Tensor] = lambda t: t) -> tuple[Tensor, Metrics]:
    """KTO and APO-zero on (x, y, desirable?) examples."""
    metrics: Metrics = {}
    if method is Method.KTO:
        # the mismatched pairs right after the policy pass, under no_grad (z₀ is a constant), reusing the
        # prompts' keys and values when batch.kl is a suffix batch
        out, kl_out = policy(batch.policy, batch.kl)
        logps = out.sums  # (B,)
        with torch.no_grad():
            mean_logratio = (kl_out.sums.float() - reference(batch, "kl")).mean()
        kl = clamp_kl(reduce_mean(mean_logratio))
    else:
        logps = policy(batch.policy).sums  # (B,)
    ref_logps = reference(batch, "policy")
    if method is Method.KTO:
        out = kto_loss(logps, ref_logps, batch.is_desirable, kl, **loss_kwargs)
        metrics["kl"] = stat(kl)
    else:
        out = apo_zero_unpaired_loss(logps, ref_logps, batch.is_desirable, **loss_kwargs)
    loss = out.losses.mean()
    good, bad = batch.is_desirable, ~batch.is_desirable
    metrics.update({
        "loss": stat(loss),
        "rewards/chosen": stat(out.rewards, good), "rewards/rejected": stat(out.rewards, bad),
        "logps/chosen": stat(logps, good), "logps/rejected": stat(logps, bad),
    })
    return loss, metrics


def paired_step(policy, batch: Batch, reference, *, method: Method, loss_kwargs: dict,
                nll_weight: float = 0.0) -> tuple[Tensor, Metrics]:
    """DPO, cDPO, IPO, SLiC, SimPO, ORPO, IdkDPO on (x, chosen, rejected): one forward over 2B sequences."""
    logps = policy(batch.policy)
    b = batch.num_examples
    values = logps.means if method.uses_avg_logps else logps.sums
    chosen, rejected = values[:b], values[b:]
    args: tuple = (chosen, rejected)
    if method.needs_reference:
        ref = reference(batch, "policy")
        args += (ref[:b], ref[b:])
    out = method.loss_fn(*args, **loss_kwargs)
    loss = out.losses.mean()
    if method in (Method.SLIC, Method.ORPO):
        nll = -logps.sums[:b].sum() / logps.counts[:b].sum().clamp(min=1)
        loss = loss + (nll_weight if method is Method.SLIC else 1.0) * nll
    metrics = {
        "loss": stat(loss),
        "rewards/chosen": stat(out.rewards[0]), "rewards/rejected": stat(out.rewards[1]),
        "rewards/margins": stat(out.rewards[0] - out.rewards[1]),
        "rewards/accuracies": stat((out.rewards[0] > out.rewards[1]).float()),
        "logps/chosen": stat(logps.sums[:b]), "logps/rejected": stat(logps.sums[b:]),
    }
    return loss, metrics


def unlearning_step(policy, batch: Batch, reference, *, method: Method, loss_kwargs: dict,
                    retain_weight: float = 0.0) -> tuple[Tensor, Metrics]:
    """GA, GD, NPO, NPO+RT, SimNPO on the forget sequences, plus ``retain_weight`` × NLL on retain."""
    logps = policy(batch.policy)
    if method is Method.SIMNPO:
        out = method.loss_fn(logps.means, **loss_kwargs)
    elif method.needs_reference:
        out = method.loss_fn(logps.sums, reference(batch, "policy"), **loss_kwargs)
    else:
        out = method.loss_fn(logps.sums, **loss_kwargs)
    forget_loss = out.losses.mean()
    metrics = {"forget_loss": stat(forget_loss), "logps/forget": stat(logps.sums)}
    return add_retain_term(policy, batch, forget_loss, metrics, retain_weight), metrics


def add_retain_term(policy, batch: Batch, loss: Tensor, metrics: Metrics, retain_weight: float) -> Tensor:
    """``loss + retain_weight × token-mean NLL`` on ``batch.retain`` (GD, NPO+RT, SimNPO, IdkDPO);
    records ``retain_loss`` and the total ``loss`` in ``metrics``."""
    if batch.retain is not None and retain_weight > 0:
        retain_nll = token_mean_nll(policy(batch.retain))
        loss = loss + retain_weight * retain_nll
        metrics["retain_loss"] = stat(retain_nll)
    metrics["loss"] = stat(loss)
    return loss


def make_step(method: Method, settings: Any, *, reduce_mean: Callable[[Tensor], Tensor],
              kto_weights: tuple[float, float] | None = None) -> StepFn:
    """The step function of ``method`` with its hyper-parameters bound (the one dispatch point).

    ``settings`` is the method's config section (or None); ``kto_weights`` = (λ_D, λ_U) resolved
    from the data when the config leaves them null.
    """
    family = method.family
    if family == "sft":
        return sft_step
    if family == "unpaired":
        kwargs = {"beta": settings.beta}
        if method is Method.KTO:
            kwargs.update(desirable_weight=kto_weights[0], undesirable_weight=kto_weights[1])
        return partial(unpaired_step, method=method, loss_kwargs=kwargs, reduce_mean=reduce_mean)
    if family == "paired":
        kwargs = {
            Method.DPO: lambda s: {"beta": s.beta},
            Method.IDK_DPO: lambda s: {"beta": s.beta},
            Method.CDPO: lambda s: {"beta": s.beta, "label_smoothing": s.label_smoothing},
            Method.IPO: lambda s: {"beta": s.beta},
            Method.SLIC: lambda s: {"delta": s.delta},
            Method.SIMPO: lambda s: {"beta": s.beta, "gamma": s.gamma},
            Method.ORPO: lambda s: {"lam": s.lam},
        }[method](settings)
        step = partial(paired_step, method=method, loss_kwargs=kwargs,
                       nll_weight=getattr(settings, "nll_weight", 0.0))
        if method is Method.IDK_DPO:
            return partial(_with_retain, step, retain_weight=settings.retain_weight)
        return step
    kwargs = {
        Method.GA: {}, Method.GD: {},
        Method.NPO: {"beta": getattr(settings, "beta", None)},
        Method.NPO_RT: {"beta": getattr(settings, "beta", None)},
        Method.SIMNPO: {"beta": getattr(settings, "beta", None), "gamma": getattr(settings, "gamma", None)},
    }[method]
    return partial(unlearning_step, method=method, loss_kwargs=kwargs,
                   retain_weight=getattr(settings, "retain_weight", 0.0))


def _with_retain(step: StepFn, policy, batch: Batch, reference, *, retain_weight: float):
    """IdkDPO: the paired loss on (idk, forget answer) pairs plus the retain NLL."""
    loss, metrics = step(policy, batch, reference)
    return add_retain_term(policy, batch, loss, metrics, retain_weight), metrics


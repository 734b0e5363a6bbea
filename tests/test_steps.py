"""Training steps equal an independent plain-PyTorch computation of each objective on the same batch.

The hand computation never touches halokit's layout or chunked log-probs: each (prompt, completion)
is run alone through ``model(input_ids).logits`` and scored by a naive log_softmax + gather,

    log π(y|x) = Σ_{t ≥ |x|} log_softmax(logits[t − 1])[ids[t]],   n(y) = |y|

and the losses are written out from the papers. The policy (seed 0) and the reference (seed 1) are
different models, so log-ratios r = log π − log π_ref and KTO's z₀ are far from 0.
"""

import functools
import math

import pytest
import torch

from halokit.attention import use_varlen
from halokit.config import (
    BetaSettings,
    IdkDPOSettings,
    KTOSettings,
    NPORTSettings,
    ORPOSettings,
    RetainSettings,
    SimPOSettings,
    SLiCSettings,
)
from halokit.data.collate import collate, layout
from halokit.logprobs import LogpsModel
from halokit.losses import kto_loss
from halokit.methods import Method
from halokit.models import build_tiny_model
from halokit.reference import ModelReference
from halokit.steps import make_step, sft_step, stat, unlearning_step

V = 259
OPTS = {"pad_id": 0, "packing": True, "row_tokens": 32}
IS_DESIRABLE = [True, False, False, True]
BETA, LAMBDA_D, LAMBDA_U = 0.1, 1.3, 0.7


def ids(g, n):
    return torch.randint(3, V, (n,), generator=g).tolist()


def make_records():
    """4 feedback examples, 3 preference pairs and 3 retain examples of assorted lengths."""
    g = torch.Generator().manual_seed(0)
    feedback = [{"prompt_ids": [1] + ids(g, p), "completion_ids": ids(g, c) + [2], "is_desirable": d}
                for (p, c), d in zip([(4, 5), (2, 8), (6, 3), (3, 6)], IS_DESIRABLE)]
    pairs = [{"prompt_ids": [1] + ids(g, p), "chosen_ids": ids(g, c) + [2], "rejected_ids": ids(g, r) + [2]}
             for p, c, r in [(3, 4, 6), (5, 7, 2), (2, 3, 3)]]
    retain = [([1] + ids(g, p), ids(g, c) + [2]) for p, c in [(2, 5), (4, 2), (3, 9)]]
    return feedback, pairs, retain


FEEDBACK, PAIRS, RETAIN = make_records()


@pytest.fixture(scope="module")
def models():
    # initializer_range 0.1 (Llama's default 0.02 gives near-uniform next-token distributions, so
    # every log-ratio would be ~0): here |r| is a few nats and z₀ ≈ 1.8.
    peaked = {"initializer_range": 0.1}
    return build_tiny_model(peaked, vocab_size=V, seed=0), build_tiny_model(peaked, vocab_size=V, seed=1)


@pytest.fixture(scope="module")
def varlen_models():
    """The same two models attending with varlen attention: the KL pass reuses the prompts' keys and values."""
    pair = tuple(build_tiny_model({"initializer_range": 0.1}, vocab_size=V, seed=s) for s in (0, 1))
    for model in pair:
        assert use_varlen(model) is None
    return pair


@pytest.fixture(params=["sdpa", "varlen"])
def engine_setup(request, models, varlen_models):
    """(models, policy, reference, collate options) with the KL batch laid out in full (sdpa) or as the
    suffixes that continue the policy pass's prompts (varlen, reuse_prompts); for preference pairs the
    rejected sequences continue their chosen one's prompt in the same pass."""
    pair = models if request.param == "sdpa" else varlen_models
    pair[0].zero_grad(set_to_none=True)
    opts = OPTS if request.param == "sdpa" else {**OPTS, "reuse_prompts": True}
    return pair, LogpsModel(pair[0]), ModelReference(LogpsModel(pair[1])), opts


@pytest.fixture
def policy(models):
    models[0].zero_grad(set_to_none=True)
    return LogpsModel(models[0])


@pytest.fixture
def reference(models):
    return ModelReference(LogpsModel(models[1]))


def naive(model, prompt, completion):
    """(Σ log p over the completion tokens, number of completion tokens) from the full logits."""
    return _naive(model, tuple(prompt), tuple(completion))


@functools.cache  # the models are never updated in this file
def _naive(model, prompt, completion):
    input_ids = torch.tensor([prompt + completion])  # (1, T)
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()  # (T, V)
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, input_ids[0, 1:, None]).squeeze(1)  # (T−1,)
    return logps[len(prompt) - 1:].sum().item(), len(completion)


def naive_r(models, prompt, completion):
    """Hand log-ratio log π(y|x) − log π_ref(y|x)."""
    return naive(models[0], prompt, completion)[0] - naive(models[1], prompt, completion)[0]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def hand_z0_raw(models, records):
    """Mean log-ratio over KTO's KL pairs (x_i, y_{(i+1) mod B}), before the clamp."""
    b = len(records)
    return sum(naive_r(models, records[i]["prompt_ids"], records[(i + 1) % b]["completion_ids"])
               for i in range(b)) / b


def hand_kto(models, records, z0):
    """KTO: mean over the batch of λ_D(1 − σ(β(r − z₀))) (desirable) or λ_U(1 − σ(β(z₀ − r)))."""
    losses = []
    for rec in records:
        r = naive_r(models, rec["prompt_ids"], rec["completion_ids"])
        if rec["is_desirable"]:
            losses.append(LAMBDA_D * (1 - sigmoid(BETA * (r - z0))))
        else:
            losses.append(LAMBDA_U * (1 - sigmoid(BETA * (z0 - r))))
    return sum(losses) / len(losses)


def assert_stat(metric, total, count, rel=1e-5):
    assert metric.shape == (2,) and not metric.requires_grad
    assert metric[1].item() == count
    assert metric[0].item() == pytest.approx(total, rel=rel, abs=1e-5)


def kto_step(reduce_mean=lambda t: t):
    return make_step(Method.KTO, KTOSettings(beta=BETA), reduce_mean=reduce_mean, kto_weights=(LAMBDA_D, LAMBDA_U))


# ------------------------------------------------------------------------------------------------ KTO
def test_kto_step_equals_the_hand_computation(engine_setup):
    models, policy, reference, opts = engine_setup
    batch = collate(FEEDBACK, range(4), with_kl=True, **opts)
    assert (batch.kl.prefix is not None) == ("reuse_prompts" in opts)
    z0 = hand_z0_raw(models, FEEDBACK)
    assert z0 > 1.0  # policy and reference differ: a non-trivial reference point
    loss, metrics = kto_step()(policy, batch, reference)
    assert loss.item() == pytest.approx(hand_kto(models, FEEDBACK, z0), rel=1e-5)
    assert loss.requires_grad

    assert set(metrics) == {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    rs = [naive_r(models, r["prompt_ids"], r["completion_ids"]) for r in FEEDBACK]
    lp = [naive(models[0], r["prompt_ids"], r["completion_ids"])[0] for r in FEEDBACK]
    good = [i for i in range(4) if IS_DESIRABLE[i]]
    bad = [i for i in range(4) if not IS_DESIRABLE[i]]
    assert_stat(metrics["loss"], loss.item(), 1)
    assert_stat(metrics["kl"], z0, 1)
    assert_stat(metrics["rewards/chosen"], BETA * sum(rs[i] for i in good), 2)
    assert_stat(metrics["rewards/rejected"], BETA * sum(rs[i] for i in bad), 2)
    assert_stat(metrics["logps/chosen"], sum(lp[i] for i in good), 2)
    assert_stat(metrics["logps/rejected"], sum(lp[i] for i in bad), 2)


def test_kto_reduces_the_mean_logratio_before_the_clamp(models):
    """``reduce_mean`` (the cross-process average) sees the *un-clamped* mean; z₀ = max(0, reduced).

    With the roles swapped (policy seed 1, reference seed 0) the local mean log-ratio is −m < 0. A
    reduce that returns −m + 2m = m must give z₀ = m (clamping first would give 0 + 2m); one that
    returns −m − 1 must give z₀ = 0 (clamping first would pass −1 through).
    """
    swapped = (models[1], models[0])
    policy, reference = LogpsModel(models[1]), ModelReference(LogpsModel(models[0]))
    m = hand_z0_raw(models, FEEDBACK)
    assert m > 1.0 and hand_z0_raw(swapped, FEEDBACK) == pytest.approx(-m, rel=1e-5)
    batch = collate(FEEDBACK, range(4), with_kl=True, **OPTS)
    seen = []

    def shift_up(t):
        seen.append(t)
        return t + 2 * m

    loss, metrics = kto_step(shift_up)(policy, batch, reference)
    assert len(seen) == 1 and seen[0].shape == () and not seen[0].requires_grad
    assert seen[0].item() == pytest.approx(-m, rel=1e-5)
    assert_stat(metrics["kl"], m, 1)
    assert loss.item() == pytest.approx(hand_kto(swapped, FEEDBACK, m), rel=1e-5)

    loss, metrics = kto_step(lambda t: t - 1.0)(policy, batch, reference)
    assert metrics["kl"][0].item() == 0.0
    assert loss.item() == pytest.approx(hand_kto(swapped, FEEDBACK, 0.0), rel=1e-5)


def test_no_gradient_flows_through_the_kl_pass(engine_setup):
    """The step's gradients equal those of the same loss with z₀ a plain constant, and the KL forward
    builds no graph at all."""
    models, policy, reference, opts = engine_setup
    batch = collate(FEEDBACK, range(4), with_kl=True, **opts)
    outputs = []

    def recording_policy(seq, follow=None):
        out = policy(seq, follow)
        for s, o in zip((seq, follow), out, strict=True):
            outputs.append((s is batch.kl, o.sums.requires_grad))
        return out

    loss, _ = kto_step()(recording_policy, batch, reference)
    assert sorted(outputs) == [(False, True), (True, False)]
    loss.backward()
    grads = {k: p.grad.clone() for k, p in models[0].named_parameters()}
    assert sum(g.abs().sum() for g in grads.values()) > 0
    models[0].zero_grad(set_to_none=True)

    z0 = torch.tensor(hand_z0_raw(models, FEEDBACK))
    out = kto_loss(policy(batch.policy).sums, reference(batch, "policy"), batch.is_desirable, z0,
                   beta=BETA, desirable_weight=LAMBDA_D, undesirable_weight=LAMBDA_U)
    out.losses.mean().backward()
    for k, p in models[0].named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-7, msg=k)


def test_apo_zero_unpaired_step_equals_the_hand_computation(models, policy, reference):
    """APO-zero: desirable 1 − σ(βr), undesirable σ(βr); no KL pairs and no kl metric."""
    step = make_step(Method.APO_ZERO_UNPAIRED, BetaSettings(beta=0.3), reduce_mean=lambda t: t)
    loss, metrics = step(policy, collate(FEEDBACK, range(4), **OPTS), reference)
    rs = [naive_r(models, r["prompt_ids"], r["completion_ids"]) for r in FEEDBACK]
    expect = sum(1 - sigmoid(0.3 * r) if d else sigmoid(0.3 * r) for r, d in zip(rs, IS_DESIRABLE)) / 4
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert "kl" not in metrics


# --------------------------------------------------------------------------------------------- paired
def pair_values(models):
    """Per pair: (log π_w, log π_l, log π_ref,w, log π_ref,l, n_w, n_l)."""
    out = []
    for r in PAIRS:
        (pw, nw), (pl, nl) = (naive(models[0], r["prompt_ids"], r[k]) for k in ("chosen_ids", "rejected_ids"))
        (rw, _), (rl, _) = (naive(models[1], r["prompt_ids"], r[k]) for k in ("chosen_ids", "rejected_ids"))
        out.append((pw, pl, rw, rl, nw, nl))
    return out


def nll_chosen(values):
    """Token-mean NLL of the chosen completions over the micro-batch: −Σ log π_w / Σ n_w."""
    return -sum(v[0] for v in values) / sum(v[4] for v in values)


def test_dpo_step_equals_the_hand_computation(engine_setup):
    """DPO: −log σ(β·h), h = (log π_w − log π_ref,w) − (log π_l − log π_ref,l), mean over pairs."""
    models, policy, reference, opts = engine_setup
    beta = 0.2
    batch = collate(PAIRS, range(3), **opts)
    assert (batch.policy.prefix is not None) == ("reuse_prompts" in opts)
    loss, metrics = make_step(Method.DPO, BetaSettings(beta=beta), reduce_mean=lambda t: t)(policy, batch, reference)
    values = pair_values(models)
    chosen = [beta * (v[0] - v[2]) for v in values]
    rejected = [beta * (v[1] - v[3]) for v in values]
    expect = sum(-log_sigmoid(c - r) for c, r in zip(chosen, rejected)) / 3
    assert min(abs(c) for c in chosen) > 0.1  # the two models really differ
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"}
    assert_stat(metrics["rewards/chosen"], sum(chosen), 3)
    assert_stat(metrics["rewards/rejected"], sum(rejected), 3)
    assert_stat(metrics["rewards/margins"], sum(chosen) - sum(rejected), 3)
    assert_stat(metrics["rewards/accuracies"], sum(c > r for c, r in zip(chosen, rejected)), 3)
    assert_stat(metrics["logps/chosen"], sum(v[0] for v in values), 3)
    assert_stat(metrics["logps/rejected"], sum(v[1] for v in values), 3)


def test_simpo_step_equals_the_hand_computation(models, policy):
    """SimPO: −log σ(β(ā_w − ā_l) − γ), ā = log π / n; no reference is called."""
    beta, gamma = 2.0, 0.5
    step = make_step(Method.SIMPO, SimPOSettings(beta=beta, gamma=gamma), reduce_mean=lambda t: t)
    loss, metrics = step(policy, collate(PAIRS, range(3), **OPTS), None)
    values = pair_values(models)
    expect = sum(-log_sigmoid(beta * (v[0] / v[4] - v[1] / v[5]) - gamma) for v in values) / 3
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert_stat(metrics["rewards/chosen"], sum(beta * v[0] / v[4] for v in values), 3)


def test_slic_step_adds_the_weighted_nll_of_the_chosen(models, policy):
    """SLiC-HF: max(0, δ − (log π_w − log π_l)) mean + λ · token-mean NLL of the chosen."""
    delta, nll_weight = 5.0, 0.3
    step = make_step(Method.SLIC, SLiCSettings(delta=delta, nll_weight=nll_weight), reduce_mean=lambda t: t)
    loss, _ = step(policy, collate(PAIRS, range(3), **OPTS), None)
    values = pair_values(models)
    hinge = [max(0.0, delta - (v[0] - v[1])) for v in values]
    assert 0 < sum(h > 0 for h in hinge) < 3  # both sides of the hinge occur
    expect = sum(hinge) / 3 + nll_weight * nll_chosen(values)
    assert loss.item() == pytest.approx(expect, rel=1e-5)


def test_orpo_step_adds_the_nll_of_the_chosen(models, policy):
    """ORPO: token-mean NLL of the chosen − λ·log σ(log odds_w − log odds_l), log odds = ā − log(1 − e^ā)."""
    lam = 0.25
    step = make_step(Method.ORPO, ORPOSettings(lam=lam), reduce_mean=lambda t: t)
    loss, metrics = step(policy, collate(PAIRS, range(3), **OPTS), None)
    values = pair_values(models)

    def log_odds(a):
        return a - math.log(1 - math.exp(a))

    odds_terms = [-lam * log_sigmoid(log_odds(v[0] / v[4]) - log_odds(v[1] / v[5])) for v in values]
    expect = nll_chosen(values) + sum(odds_terms) / 3
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert_stat(metrics["loss"], expect, 1)


# ----------------------------------------------------------------------------------- SFT, unlearning
def retain_seq():
    return layout(RETAIN, pad_id=0, packing=True, row_tokens=32)


def retain_nll(model):
    scored = [naive(model, p, c) for p, c in RETAIN]
    return -sum(s for s, _ in scored) / sum(n for _, n in scored)


def forget_batch():
    records = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in FEEDBACK]
    batch = collate(records, range(4), **OPTS)
    batch.retain = retain_seq()
    return records, batch


def test_idk_dpo_adds_the_weighted_retain_nll(models, policy, reference):
    """IdkDPO: the DPO loss on (refusal, forget answer) pairs + w · token-mean NLL on retain."""
    beta, w = 0.2, 0.4
    batch = collate(PAIRS, range(3), **OPTS)
    batch.retain = retain_seq()
    step = make_step(Method.IDK_DPO, IdkDPOSettings(beta=beta, retain_weight=w), reduce_mean=lambda t: t)
    loss, metrics = step(policy, batch, reference)
    dpo = sum(-log_sigmoid(beta * ((v[0] - v[2]) - (v[1] - v[3]))) for v in pair_values(models)) / 3
    assert loss.item() == pytest.approx(dpo + w * retain_nll(models[0]), rel=1e-5)
    assert_stat(metrics["loss"], loss.item(), 1)
    assert_stat(metrics["retain_loss"], retain_nll(models[0]), 1)


def test_sft_step_is_the_token_mean_nll(models, policy):
    records, batch = forget_batch()
    loss, metrics = sft_step(policy, batch)
    scored = [naive(models[0], r["prompt_ids"], r["completion_ids"]) for r in records]
    assert loss.item() == pytest.approx(-sum(s for s, _ in scored) / sum(n for _, n in scored), rel=1e-5)
    assert_stat(metrics["logps/chosen"], sum(s for s, _ in scored), 4)


def test_npo_step_equals_the_hand_computation(models, policy, reference):
    """NPO: −(2/β)·log σ(−β·r), mean over the forget batch; no retain term without a retain weight."""
    beta = 0.5
    records, batch = forget_batch()
    loss, metrics = make_step(Method.NPO, BetaSettings(beta=beta), reduce_mean=lambda t: t)(policy, batch, reference)
    rs = [naive_r(models, r["prompt_ids"], r["completion_ids"]) for r in records]
    expect = sum(-(2 / beta) * log_sigmoid(-beta * r) for r in rs) / 4
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert set(metrics) == {"loss", "forget_loss", "logps/forget"}


def test_npo_rt_adds_the_weighted_retain_nll(models, policy, reference):
    beta, w = 0.5, 0.7
    records, batch = forget_batch()
    step = make_step(Method.NPO_RT, NPORTSettings(beta=beta, retain_weight=w), reduce_mean=lambda t: t)
    loss, metrics = step(policy, batch, reference)
    rs = [naive_r(models, r["prompt_ids"], r["completion_ids"]) for r in records]
    forget = sum(-(2 / beta) * log_sigmoid(-beta * r) for r in rs) / 4
    assert loss.item() == pytest.approx(forget + w * retain_nll(models[0]), rel=1e-5)
    assert_stat(metrics["forget_loss"], forget, 1)
    assert_stat(metrics["retain_loss"], retain_nll(models[0]), 1)


def test_gradient_difference_is_ascent_plus_retain_nll(models, policy):
    """GD: mean log π(y|x) on forget + w · token-mean NLL on retain; the same step with weight 0 drops it."""
    w = 2.0
    records, batch = forget_batch()
    loss, metrics = make_step(Method.GD, RetainSettings(retain_weight=w), reduce_mean=lambda t: t)(policy, batch, None)
    forget = sum(naive(models[0], r["prompt_ids"], r["completion_ids"])[0] for r in records) / 4
    assert loss.item() == pytest.approx(forget + w * retain_nll(models[0]), rel=1e-5)
    loss0, metrics0 = unlearning_step(policy, batch, None, method=Method.GD, loss_kwargs={}, retain_weight=0.0)
    assert loss0.item() == pytest.approx(forget, rel=1e-5) and "retain_loss" not in metrics0


def test_stat_is_a_detached_masked_sum_and_count():
    values = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    assert stat(values).tolist() == [7.0, 3.0]
    assert stat(values, torch.tensor([True, False, True])).tolist() == [5.0, 2.0]
    assert stat(values, torch.tensor([False, False, False])).tolist() == [0.0, 0.0]
    assert not stat(values).requires_grad and stat(values.double()).dtype == torch.float32


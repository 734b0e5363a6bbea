"""Sampling and scoring a model on prompts: desirable rate (greedy and sampled), judge score, KL to a
reference model, mean length.

A *judge* is a callable ``judge(prompt_text, response) -> float`` in [0, 1]; a response is desirable when
its score is >= 0.5. ``load_judge`` takes a built-in name (``demo``) or ``module:function``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from halokit.data.collate import layout
from halokit.data.examples import Text
from halokit.data.tokenize import TokenizeSettings, encode_many, render
from halokit.errors import UserError
from halokit.logprobs import LogpsModel

Judge = Callable[[str, str], float]


def load_judge(spec: str) -> Judge:
    """``"demo"`` (the demo task's rule-based judge) or ``"package.module:function"``."""
    if spec == "demo":
        from halokit.tasks.demo_task import judge

        return judge
    module, sep, name = spec.partition(":")
    if not sep:
        raise UserError(f"judge {spec!r}: expected a built-in name (demo) or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"judge {spec!r}: cannot import it ({err})") from err
    if not callable(fn):
        raise UserError(f"judge {spec!r}: {name} is not callable")
    return fn


def prompt_text(prompt: Text) -> str:
    """The user's text of a prompt (the last user message of a chat prompt), as judges read it."""
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[Text], *, num_samples: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0,
             chat_template: str = "auto", progress: Callable[[int], None] = lambda n: None) -> list[list[str]]:
    """Responses to each prompt: ``num_samples`` per prompt, greedy when ``temperature == 0``.

    Prompts are rendered exactly as in training with ``chat_template`` (``data.chat_template``: auto, the
    template for message lists only; always; never); batches are left-padded.
    Returns ``out[i][k]``, the k-th response to prompt i, decoded without special tokens. Seeded.
    """
    was_training = model.training
    model.eval()
    rendered = []
    for p in prompts:
        text, _, templated = render(tokenizer, p, "x", chat_template)
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        rendered += [ids] * num_samples
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    texts: list[str] = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start:start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        torch.manual_seed(seed + start)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
            if temperature > 0 else {"do_sample": False}
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad, **sampling)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        progress(len(chunk))
    if was_training:
        model.train()
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


@torch.no_grad()
def sequence_kl(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[Text],
                responses: Sequence[str], *, batch_size: int = 64, chat_template: str = "auto") -> float:
    """Monte-Carlo KL(π ‖ π_ref) per sequence: mean over responses y ~ π(·|x) of
    log π(y|x) − log π_ref(y|x) (responses must be samples of ``policy``)."""
    encoded = encode_many(tokenizer, list(zip(prompts, responses)), TokenizeSettings(chat_template=chat_template))
    pairs = [(e.prompt_ids, e.completion_ids) for e in encoded]
    pad = tokenizer.pad_token_id
    total = 0.0
    a, b = LogpsModel(policy).eval(), LogpsModel(reference).eval()
    device = next(policy.parameters()).device
    for start in range(0, len(pairs), batch_size):
        seq = layout(pairs[start:start + batch_size], pad_id=pad).to(device)
        total += float((a(seq).sums - b(seq).sums).sum())
    return total / max(len(pairs), 1)


def evaluate_model(model: Any, tokenizer: Any, prompts: Sequence[Text], judge: Judge, *,
                   reference: Any = None, num_samples: int = 4, temperature: float = 1.0,
                   max_new_tokens: int = 32, seed: int = 0, kinds: Sequence[str] | None = None,
                   chat_template: str = "auto") -> dict:
    """Greedy and sampled desirable rates with 95 % bootstrap CIs over prompts, mean judge score,
    KL to ``reference`` (on the sampled responses; None without a reference), mean response length
    in characters, and the greedy rate per kind when ``kinds`` (one per prompt) is given. Prompts are
    rendered with ``chat_template`` as in training (:func:`generate`)."""
    from halokit.report import bootstrap_ci

    greedy = [r[0] for r in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                     chat_template=chat_template)]
    sampled = generate(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature,
                       max_new_tokens=max_new_tokens, seed=seed + 1, chat_template=chat_template)
    texts = [prompt_text(p) for p in prompts]
    greedy_scores = [float(judge(t, r)) for t, r in zip(texts, greedy)]
    sampled_scores = [float(judge(t, r)) for t, rs in zip(texts, sampled) for r in rs]
    greedy_ok = [int(s >= 0.5) for s in greedy_scores]
    sampled_ok = [int(s >= 0.5) for s in sampled_scores]
    # per prompt mean of its samples, so that the CI is over prompts, not over correlated samples
    per_prompt = [sum(sampled_ok[i * num_samples:(i + 1) * num_samples]) / num_samples for i in range(len(prompts))]
    g_mean, g_lo, g_hi = bootstrap_ci(greedy_ok, seed=seed)
    s_mean, s_lo, s_hi = bootstrap_ci(per_prompt, seed=seed)
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    flat_sampled = [r for rs in sampled for r in rs]
    kl = None if reference is None else sequence_kl(model, reference, tokenizer, flat_prompts, flat_sampled,
                                                    chat_template=chat_template)
    out = {
        "desirable_greedy": {"mean": g_mean, "ci": [g_lo, g_hi]},
        "desirable_sampled": {"mean": s_mean, "ci": [s_lo, s_hi]},
        "judge_score": sum(greedy_scores) / len(greedy_scores),
        "kl_to_sft": kl,
        "mean_length": sum(map(len, greedy)) / len(greedy),
        "n_prompts": len(prompts),
        "greedy_desirable": greedy_ok,
        "sampled_desirable": sampled_ok,
        "examples": [{"prompt": t, "greedy": r, "desirable": bool(o)} for t, r, o in
                     list(zip(texts, greedy, greedy_ok))[:12]],
    }
    if kinds is not None:
        out["per_category"] = {k: sum(o for o, kk in zip(greedy_ok, kinds) if kk == k) /
                               max(1, sum(kk == k for kk in kinds)) for k in dict.fromkeys(kinds)}
    return out

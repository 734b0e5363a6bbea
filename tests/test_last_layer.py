"""The last decoder layer on the read positions only equals the full layer there: values and gradients, for
plain packed rows, KTO's KL suffix pass and shared preference prompts; padded batches use the full layer."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from halokit.attention import use_varlen
from halokit.data.collate import collate
from halokit.last_layer import use_read_positions_only
from halokit.lean import use_lean_layers
from halokit.logprobs import LogpsModel

V = 61
SMALL = {"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 512,
         "initializer_range": 0.2}


def model_pair(kind: str):
    """Two float64 copies of one random model with lean norms and varlen attention; the second reads only
    the needed positions in its last layer."""
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    pair = []
    for read_only in (False, True):
        torch.manual_seed(0)
        model = model_cls(config_cls(**SMALL, attn_implementation="sdpa")).double()
        use_lean_layers(model)
        assert use_varlen(model) is None
        assert not read_only or use_read_positions_only(model)
        pair.append(model)
    return pair


def records(kind: str):
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    lengths = [(6, 5, 3), (2, 8, 4), (9, 3, 7), (4, 4, 1)]
    if kind == "feedback":
        return [{"prompt_ids": ids(p), "completion_ids": ids(c), "is_desirable": True} for p, c, _ in lengths]
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in lengths]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("data", ["feedback", "preference"])
def test_read_positions_equal_the_full_last_layer(kind, data, monkeypatch):
    import halokit.last_layer as last_layer

    calls = []
    inner = last_layer.varlen_attention
    monkeypatch.setattr(last_layer, "varlen_attention", lambda *a, **k: calls.append(1) or inner(*a, **k))
    recs = records(data)
    batch = collate(recs, range(4), with_kl=data == "feedback", pad_id=0, row_tokens=1 << 20, bucket=True,
                    reuse_prompts=True)
    weights = torch.arange(1.0, batch.policy.num_sequences + 1, dtype=torch.float64)
    got = []
    for model in model_pair(kind):
        lm = LogpsModel(model)
        if batch.kl is not None:
            out, kl = lm(batch.policy, batch.kl)
        else:
            out, kl = lm(batch.policy), None
        (out.sums * weights).sum().backward()
        got.append((out.sums.detach(), kl, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_kl, full_grads), (read, read_kl, read_grads) = got
    assert len(calls) == (2 if data == "feedback" else 1)  # the read path ran (policy pass, and the KL pass)
    torch.testing.assert_close(read, full, rtol=1e-11, atol=1e-11)
    if full_kl is not None:
        torch.testing.assert_close(read_kl.sums, full_kl.sums, rtol=1e-11, atol=1e-11)
    for name, g in full_grads.items():
        torch.testing.assert_close(read_grads[name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_padded_batches_and_generation_run_the_full_layer():
    full, read = model_pair("llama")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(read(input_ids=ids, attention_mask=mask).logits,
                               full(input_ids=ids, attention_mask=mask).logits)
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(read.generate(prompt, max_new_tokens=4, do_sample=False),
                       full.generate(prompt, max_new_tokens=4, do_sample=False))


def test_other_layers_are_left_alone():
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=8))  # q/k norms: not reproduced, refused
    assert not use_read_positions_only(qwen3)
    assert not use_read_positions_only(torch.nn.Linear(2, 2))

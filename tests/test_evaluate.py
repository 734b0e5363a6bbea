"""Generation and scoring: deterministic sampling, greedy decoding, KL, judges."""

import pytest

from halokit.errors import UserError
from halokit.evaluate import evaluate_model, generate, load_judge, prompt_text, sequence_kl
from halokit.models import build_tiny_model

PROMPTS = [({"role": "user", "content": "What is 12 + 30?"},), "plain prompt", ({"role": "user", "content": "hi"},)]


@pytest.fixture(scope="module")
def model(byte_tok):
    return build_tiny_model(vocab_size=len(byte_tok), seed=0).eval()


def test_generate_is_seeded_and_greedy_is_stable(model, byte_tok):
    a = generate(model, byte_tok, PROMPTS, num_samples=3, temperature=1.0, max_new_tokens=8, seed=5)
    b = generate(model, byte_tok, PROMPTS, num_samples=3, temperature=1.0, max_new_tokens=8, seed=5)
    assert a == b and len(a) == 3 and all(len(r) == 3 for r in a)
    g1 = generate(model, byte_tok, PROMPTS, max_new_tokens=8, batch_size=1)
    g2 = generate(model, byte_tok, PROMPTS, max_new_tokens=8, batch_size=3)
    assert g1 == g2  # left padding does not change greedy answers


def test_string_prompts_are_rendered_with_the_training_chat_template(model, byte_tok, monkeypatch):
    """A model trained with data.chat_template=always saw string prompts as one user message: generation
    must render them the same way (auto leaves strings plain)."""
    seen = []

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen.append(byte_tok.decode(input_ids[0][attention_mask[0].bool()]))
        return input_ids

    monkeypatch.setattr(model, "generate", fake_generate)
    generate(model, byte_tok, ["plain prompt"], chat_template="always")
    generate(model, byte_tok, ["plain prompt"])
    templated = byte_tok.apply_chat_template([{"role": "user", "content": "plain prompt"}],
                                             add_generation_prompt=True, tokenize=False)
    assert seen[0] == templated and seen[1].endswith("plain prompt") and templated not in seen[1]


def test_kl_of_a_model_with_itself_is_zero_and_positive_otherwise(model, byte_tok):
    responses = [r[0] for r in generate(model, byte_tok, PROMPTS, temperature=1.0, max_new_tokens=8, seed=1)]
    assert sequence_kl(model, model, byte_tok, PROMPTS, responses) == pytest.approx(0.0, abs=1e-6)
    other = build_tiny_model(vocab_size=len(byte_tok), seed=1).eval()
    assert sequence_kl(model, other, byte_tok, PROMPTS, responses) != pytest.approx(0.0, abs=1e-3)


def test_evaluate_model_rates_and_categories(model, byte_tok):
    out = evaluate_model(model, byte_tok, PROMPTS, lambda p, r: 1.0, num_samples=2, max_new_tokens=4,
                         kinds=["a", "b", "a"])
    assert out["desirable_greedy"]["mean"] == 1.0 and out["desirable_sampled"]["ci"] == [1.0, 1.0]
    assert out["per_category"] == {"a": 1.0, "b": 1.0} and out["n_prompts"] == 3
    none = evaluate_model(model, byte_tok, PROMPTS, lambda p, r: 0.0, num_samples=2, max_new_tokens=4,
                          reference=model)
    assert none["desirable_greedy"]["mean"] == 0.0 and none["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)


def test_judges():
    assert load_judge("demo")("What is 1 + 2?", "3") == 1.0
    assert load_judge("halokit.tasks.demo_task:judge") is load_judge("demo")
    with pytest.raises(UserError, match="module:function"):
        load_judge("nonsense")
    with pytest.raises(UserError, match="cannot import"):
        load_judge("no.such.module:f")
    assert prompt_text(PROMPTS[0]) == "What is 12 + 30?" and prompt_text("x") == "x"

"""halokit.models: tiny models, loading (safetensors, GGUF), LoRA, frozen copies, fingerprints, saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from halokit.attention import supports_varlen
from halokit.config import LoraSettings, ModelSettings
from halokit.data.tokenizer import byte_level_tokenizer
from halokit.errors import UserError
from halokit.lora import adapters_disabled, add_lora, has_adapters
from halokit.models import (
    autocast_context,
    build_tiny_model,
    load_model,
    load_policy,
    save_model,
)
from halokit.reference import frozen_copy, weights_fingerprint

VOCAB = 259  # the byte tokenizer's size


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))  # (B, T)


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits  # (B, T, V)


def perturb_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA starts with B = 0 (adapters change nothing); give B values so the adapters matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------- build
def test_tiny_model_is_deterministic_per_seed_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_tiny_model(vocab_size=VOCAB, seed=3), build_tiny_model(vocab_size=VOCAB, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert same_weights(a, b)
    assert not same_weights(a, build_tiny_model(vocab_size=VOCAB, seed=4))


def test_tiny_model_defaults_and_overrides():
    model = build_tiny_model({"num_hidden_layers": 1, "tie_word_embeddings": True}, vocab_size=VOCAB)
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (64, 4, 2, 128)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id, c.vocab_size) == (0, 1, 2, VOCAB)
    assert c.num_hidden_layers == 1 and model.lm_head.weight is model.model.embed_tokens.weight
    assert build_tiny_model(vocab_size=VOCAB).config.tie_word_embeddings is False
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(("overrides", "match"), [
    ({"hidden_sise": 32}, r"model\.tiny\.hidden_sise: unknown LlamaConfig field; did you mean 'hidden_size'"),
    ({"dtype": "bfloat16"}, r"model\.tiny\.dtype: .*model\.dtype"),
    ({"vocab_size": 100}, r"model\.tiny\.vocab_size: the tokenizer has 259"),
    ({"num_key_value_heads": 3}, r"model\.tiny\.num_key_value_heads"),
    ({"hidden_size": "64"}, r"model\.tiny: .*'hidden_size' expected int"),
])
def test_tiny_model_rejects_bad_keys(overrides, match):
    with pytest.raises(UserError, match=match):
        build_tiny_model(overrides, vocab_size=VOCAB)


# ---------------------------------------------------------------------------------------- save, load
def test_save_load_round_trip_is_exact(tmp_path, tokenizer, tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_model(vocab_size=VOCAB)
    model.config.use_cache = False  # as training leaves it
    out = save_model(model, tokenizer, tmp_path / "final")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert model.config.use_cache is False  # restored after writing use_cache=True to disk
    assert torch.equal(logits(load_model(out), tokens), logits(model, tokens))
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.use_cache is True
    assert torch.equal(logits(plain, tokens), logits(model, tokens))
    assert AutoTokenizer.from_pretrained(out)("hé").input_ids == tokenizer("hé").input_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_save_replaces_an_existing_directory(tmp_path, tokenizer, tokens):
    out = tmp_path / "final"
    save_model(build_tiny_model(vocab_size=VOCAB, seed=0), tokenizer, out)
    (out / "stale.txt").write_text("from the old run")
    newer = build_tiny_model(vocab_size=VOCAB, seed=1)
    save_model(newer, tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert torch.equal(logits(load_model(out), tokens), logits(newer, tokens))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_pickle_only_directory_is_refused(tmp_path):
    model = build_tiny_model(vocab_size=VOCAB)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin.*safetensors only"):
        load_model(tmp_path)


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model path not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="GGUF file not found"):
        load_model(tmp_path, gguf_file="nope.gguf")


def test_truncated_safetensors_is_a_user_error(tmp_path, tokenizer):
    out = save_model(build_tiny_model(vocab_size=VOCAB), tokenizer, tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model\.safetensors: unreadable safetensors file"):
        load_model(out)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="a Hub lookup retries for ~46 s online")
def test_gemma2_loads_with_eager_attention_or_is_refused_at_load(tmp_path, tokenizer):
    """Gemma 2 (attention logit soft-capping) has no SDPA path: auto loads it with the eager attention, an
    explicit sdpa is refused in one line."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  vocab_size=len(tokenizer), final_logit_softcapping=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    model = load_model(tmp_path / "gemma2")  # attn_implementation="auto"
    assert model.config._attn_implementation == "eager"
    assert "has no SDPA path" in supports_varlen(model)  # nor halokit's varlen attention
    with pytest.raises(UserError, match="scaled_dot_product_attention"):
        load_model(tmp_path / "gemma2", attn_implementation="sdpa")
    # the real Gemma 2 soft-caps its logits, which halokit's log-probs do not model: refused at load
    config.final_logit_softcapping = 30.0
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "capped")
    with pytest.raises(UserError, match="final_logit_softcapping=30.0"):
        load_policy(ModelSettings(path=str(tmp_path / "capped"), tokenizer="byte"))


def test_uncached_hub_id_offline_is_a_user_error():
    with pytest.raises(UserError, match="nobody/no-such-model: .*HF_HUB_OFFLINE"):
        load_model("nobody/no-such-model")


# ---------------------------------------------------------------------------------------------- GGUF
def write_llama_gguf(model: torch.nn.Module, path: Path) -> None:
    """Write a Llama as an F32 GGUF file the way llama.cpp's converter lays it out.

    llama.cpp stores q_proj/k_proj rows permuted per head (rotary halves interleaved); transformers
    undoes that permutation when it reads a llama GGUF, so the writer must apply it.
    """
    gguf = pytest.importorskip("gguf")
    c = model.config

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        w = tensor.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            w = permute(w, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            w = permute(w, c.num_key_value_heads)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path) -> tuple[torch.nn.Module, Path]:
    model = build_tiny_model(vocab_size=VOCAB, seed=5)
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    write_llama_gguf(model, path)
    return model, path


def test_gguf_loads_as_a_plain_trainable_model(tiny_gguf, tmp_path, tokenizer, tokens):
    original, path = tiny_gguf
    model = load_model(path)
    torch.testing.assert_close(logits(model, tokens), logits(original, tokens), rtol=0, atol=1e-5)
    assert not getattr(model, "is_quantized", False) and "quantization_config" not in model.config.to_dict()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    same = load_model(path.parent, gguf_file=path.name)
    assert torch.equal(logits(same, tokens), logits(model, tokens))
    out = save_model(model, tokenizer, tmp_path / "from-gguf")  # raises while the quantized flag is on
    assert torch.equal(logits(load_model(out), tokens), logits(model, tokens))


def test_a_gguf_file_is_parsed_once_per_load(tiny_gguf, monkeypatch, tokens):
    """transformers opens the file for the config and again for the weights (and the tokenizer), halokit once
    to check it: one parse serves all of them inside a load, none is kept after it."""
    import gguf

    original, path = tiny_gguf
    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    model = load_model(path)
    assert len(parsed) == 1 and gguf.GGUFReader is CountingReader
    torch.testing.assert_close(logits(model, tokens), logits(original, tokens), rtol=0, atol=1e-5)
    load_model(path)
    assert len(parsed) == 2


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_gguf_is_a_user_error(tiny_gguf, keep):
    _, path = tiny_gguf
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(UserError, match=r"tiny\.gguf: .*(truncated|corrupt)"):
        load_model(path)


def test_lora_on_gguf_saves_an_adapter_that_finds_its_base(tiny_gguf, tmp_path, tokens):
    original, path = tiny_gguf
    settings = ModelSettings(path=str(path), tokenizer="byte", lora=LoraSettings(r=4))
    model, tok = load_policy(settings)
    assert has_adapters(model) and model.training and tok.pad_token_id == 0
    torch.testing.assert_close(logits(model, tokens), logits(original, tokens), rtol=0, atol=1e-5)
    perturb_lora(model)
    reloaded = load_model(save_model(model, tok, tmp_path / "adapter"))  # base recorded as the .gguf file
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_the_adapters():
    model, _ = load_policy(ModelSettings(tiny={}, lora=LoraSettings(r=4, alpha=8.0)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B, on q/k/v/o, in 2 layers
    assert model.training


def test_unknown_lora_target_is_a_user_error():
    with pytest.raises(UserError, match=r"model\.lora\.target_modules"):
        load_policy(ModelSettings(tiny={}, lora=LoraSettings(r=4, target_modules=["qq_proj"])))


def test_adapters_disabled_gives_the_base_model_exactly(tokens):
    base = build_tiny_model(vocab_size=VOCAB)
    model, _ = load_policy(ModelSettings(tiny={}, lora=LoraSettings(r=4)))
    perturb_lora(model)
    with_adapters = logits(model, tokens)
    assert not torch.allclose(with_adapters, logits(base, tokens))
    with adapters_disabled(model) as same:
        assert same is model
        assert torch.equal(logits(model, tokens), logits(base, tokens))
    assert torch.equal(logits(model, tokens), with_adapters)


def test_adapters_disabled_needs_adapters():
    model = build_tiny_model(vocab_size=VOCAB)
    assert not has_adapters(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(model):
            pass


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapter_save_and_reload_is_exact(tmp_path, tokenizer, tokens):
    from peft import PeftModel

    model = add_lora(build_tiny_model(vocab_size=VOCAB), r=4, alpha=8.0)
    perturb_lora(model)
    out = save_model(model, tokenizer, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(build_tiny_model(vocab_size=VOCAB), str(out))
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))
    with pytest.raises(UserError, match="does not record its base model"):
        load_model(out)


def test_load_model_attaches_an_adapter_to_its_recorded_base(tmp_path, tokenizer, tokens):
    base_dir = save_model(build_tiny_model(vocab_size=VOCAB), tokenizer, tmp_path / "base")
    model = add_lora(load_model(base_dir), r=4, alpha=8.0)
    perturb_lora(model)
    out = save_model(model, tokenizer, tmp_path / "adapter")
    reloaded = load_model(out)
    assert has_adapters(reloaded)
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))


def test_merge_on_save_gives_a_plain_model(tmp_path, tokenizer, tokens):
    from transformers import AutoModelForCausalLM

    model = add_lora(build_tiny_model(vocab_size=VOCAB), r=4, alpha=8.0)
    perturb_lora(model)
    out = save_model(model, tokenizer, tmp_path / "merged", merge_lora=True)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not has_adapters(merged)
    torch.testing.assert_close(logits(merged, tokens), logits(model, tokens), rtol=0, atol=1e-5)
    assert has_adapters(model)  # the model being trained keeps its adapters


def test_load_policy_from_a_directory_falls_back_to_eos_for_padding(tmp_path):
    tok = byte_level_tokenizer()
    tok.pad_token = None
    save_model(build_tiny_model({"pad_token_id": None}, vocab_size=VOCAB), tok, tmp_path / "m")
    model, loaded = load_policy(ModelSettings(path=str(tmp_path / "m")))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert model.config.pad_token_id == 2


# -------------------------------------------------------------------------------- frozen, fingerprint
def test_frozen_copy_is_frozen_and_independent(tokens):
    model, _ = load_policy(ModelSettings(tiny={}, gradient_checkpointing=True))
    ref = frozen_copy(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert not ref(input_ids=tokens).logits.requires_grad  # the input-grad hook is not copied along
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not same_weights(model, ref) and model.training


def test_fingerprint_tracks_every_weight():
    a, b = build_tiny_model(vocab_size=VOCAB), build_tiny_model(vocab_size=VOCAB)
    fingerprint = weights_fingerprint(a)
    assert len(fingerprint) == 64 and fingerprint == weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert weights_fingerprint(b) != fingerprint
    assert weights_fingerprint(build_tiny_model(vocab_size=VOCAB, seed=1)) != fingerprint


def test_fingerprint_with_lora_covers_the_adapters():
    base_fingerprint = weights_fingerprint(build_tiny_model(vocab_size=VOCAB))
    model = add_lora(build_tiny_model(vocab_size=VOCAB), r=4, alpha=8.0)
    before = weights_fingerprint(model)
    perturb_lora(model)
    assert weights_fingerprint(model) not in (before, base_fingerprint)
    assert weights_fingerprint(model, adapters=False) == base_fingerprint  # the adapters-off reference


# ------------------------------------------------------------------------------- compute, checkpoints
def test_gradient_checkpointing_with_lora_gives_the_same_grads(tokens):
    """Train mode (checkpointing is skipped in eval) with every dropout at 0, so both runs are exact."""
    grads, recomputes = [], []
    for checkpointing in (False, True):
        settings = ModelSettings(tiny={}, gradient_checkpointing=checkpointing, lora=LoraSettings(r=4))
        model, _ = load_policy(settings, seed=7)
        perturb_lora(model)
        calls, mlp = [], model.get_base_model().model.layers[0].mlp
        # Count forward calls, not hooks: module hooks do not fire while torch recomputes a checkpoint.
        mlp.forward = lambda *a, _f=mlp.forward, _calls=calls, **kw: _calls.append(1) or _f(*a, **kw)
        model(input_ids=tokens, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        recomputes.append(len(calls))
        assert model.config.use_cache is not checkpointing
    assert recomputes == [1, 2]  # the checkpointed layer ran again in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6)


def test_bf16_autocast_runs_on_cpu_over_float32_weights(tokens):
    model = build_tiny_model(vocab_size=VOCAB).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), autocast_context("bfloat16", "cpu"):
        low = model(input_ids=tokens).logits
    assert low.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with autocast_context("float32", "cpu"):
        full = logits(model, tokens)
    assert full.dtype == torch.float32
    torch.testing.assert_close(low.float(), full, rtol=0, atol=0.05)
    with pytest.raises(UserError, match="model.dtype"):
        autocast_context("float16")


"""Lean RMSNorm / SwiGLU: forward values bit-identical to transformers', gradients equal to autograd's,
fewer bytes kept for backward; unrecognised or LoRA-wrapped modules keep their own forward."""

import copy

import pytest
import torch

from halokit.lean import _RMSNorm, _SwiGLUDown, use_lean_layers
from halokit.models import build_tiny_model


def model(dtype=torch.float32):
    m = build_tiny_model({"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 48,
                          "initializer_range": 0.2}, vocab_size=50)
    for p in m.parameters():
        p.data = p.data.to(dtype)
    return m


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for backward while ``fn()`` runs, parameters excluded."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_identical_and_gradients_match(dtype):
    plain = model(dtype)
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean) == 3 * 2 + 1  # two norms and an MLP per layer, the final norm
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    outs = {}
    for name, m in (("plain", plain), ("lean", lean)):
        logits = m(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        outs[name] = logits.detach(), {n: p.grad.float() for n, p in m.named_parameters()}
    assert torch.equal(outs["plain"][0], outs["lean"][0])
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    for name, g in outs["plain"][1].items():
        torch.testing.assert_close(outs["lean"][1][name], g, **tol, msg=name)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))
    gate = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    down = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUDown.apply, (gate, up, down, bias))


def test_keeps_fewer_bytes_for_backward():
    plain = model(torch.bfloat16)
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    ids = torch.randint(0, 50, (4, 64), generator=torch.Generator().manual_seed(2))
    params = {p.untyped_storage().data_ptr() for m in (plain, lean) for p in m.parameters()}
    sizes = {}
    for name, m in (("plain", plain), ("lean", lean)):
        _, seen = saved_bytes(lambda m=m: m.model(input_ids=ids).last_hidden_state)
        sizes[name] = sum(n for ptr, n in seen.items() if ptr not in params)
    assert sizes["lean"] < 0.75 * sizes["plain"]


def test_autocast_over_float32_weights_falls_back_to_the_plain_mlp():
    plain = model()
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(input_ids=ids).logits, lean(input_ids=ids).logits
    assert torch.equal(a, b)


def test_lora_layers_keep_their_forward():
    from halokit.lora import add_lora

    m = add_lora(model(), r=2, alpha=4, dropout=0.0, target_modules=["gate_proj", "down_proj"], seed=0)
    use_lean_layers(m)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(4))
    m(input_ids=ids).logits.sum().backward()
    assert any("lora" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters())


def test_lean_norms_survive_train_eval_switches(tmp_path):
    """transformers kernelizes models loaded with from_pretrained and re-binds the norms' forward on every
    train()/eval(); load_policy's lean norms must still be in place after such switches."""
    from halokit.config import ModelSettings
    from halokit.lean import _norm_forward
    from halokit.models import load_policy

    build_tiny_model({"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 48},
                     vocab_size=300).save_pretrained(tmp_path / "m")
    policy, _ = load_policy(ModelSettings(path=str(tmp_path / "m"), tokenizer="byte"))
    for switch in (policy.eval, policy.train, policy.eval, policy.train):
        switch()
    norms = [m for m in policy.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5
    assert all(getattr(m.forward, "__func__", None) is _norm_forward for m in norms)
    x = torch.randn(2, 9, 32, requires_grad=True)
    _, seen = saved_bytes(lambda: policy.model.norm(x))
    weight = policy.model.norm.weight.untyped_storage().data_ptr()
    assert sorted(n for ptr, n in seen.items() if ptr != weight) == [2 * 9 * 4, x.nbytes]  # r and x only

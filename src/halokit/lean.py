"""Memory-lean RMSNorm and SwiGLU MLP: the same forward values, fewer tensors kept for backward.

Autograd keeps every intermediate an op needs. For Llama-style blocks that is, per token:

- RMSNorm ``w ⊙ bf16(x₃₂ · r)``, r = 1/√(mean(x₃₂²) + ε): the float32 copy x₃₂ and the normalised
  tensor — 6 bytes per hidden unit in bf16 (8 in float32). :class:`_RMSNorm` keeps x and r only and
  recomputes the normalised tensor in backward:
      n = x₃₂·r,  ∂w = Σ_tokens ∂y ⊙ n,  ∂n = ∂y ⊙ w,  ∂x = r · (∂n − n · mean(∂n ⊙ n))
- SwiGLU ``down(silu(g) ⊙ u)``: g, silu(g), u and their product — four (tokens, intermediate)
  tensors. :class:`_SwiGLUDown` keeps g and u and recomputes the other two in backward:
      a = silu(g), m = a ⊙ u,  ∂W = ∂outᵀ m,  ∂m = ∂out W,  ∂u = ∂m ⊙ a,  ∂g = ∂m ⊙ u ⊙ silu′(g)
  with silu′(g) = σ(g)(1 + g(1 − σ(g))).

On the benchmark's body-heavy model this is ~65 MB less at the peak of a 820-token micro-batch.
:func:`use_lean_layers` swaps the ``forward`` of the modules it recognises (transformers' Llama, Qwen2,
Qwen3 and Mistral norms and MLPs: plain-weight RMSNorm, SiLU gate) and leaves everything else alone.
The MLP falls back to its own forward when autocast would cast its weights (float32 weights under bf16
autocast) or when its projections are not plain ``nn.Linear`` (LoRA layers).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}


class _RMSNorm(torch.autograd.Function):
    """y = w ⊙ cast_x(x₃₂ · r) (transformers' RMSNorm, bit for bit in the forward for bf16/float32; float64
    stays float64); saves x and r."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.to(_wide(x))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        n32 = x.to(_wide(x)) * rstd
        n = n32.to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * n).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_n = (grad_y * weight).to(n32.dtype)
            grad_x = (rstd * (grad_n - n32 * (grad_n * n32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def _wide(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class _SwiGLUDown(torch.autograd.Function):
    """out = (silu(g) ⊙ u) Wᵀ + b; saves g, u and W (not silu(g) nor the product)."""

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(g, u, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(g) * u, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        g, u, weight = ctx.saved_tensors
        a = F.silu(g)
        grad_m = grad_out @ weight  # (..., I)
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ (a * u).reshape(-1, g.shape[-1])
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        grad_u = grad_m * a
        grad_g = torch.ops.aten.silu_backward(grad_m.mul_(u), g)  # ∂m ⊙ u ⊙ silu′(g), one fused pass
        return grad_g, grad_u, grad_w, grad_b


def _norm_forward(self, hidden_states: Tensor) -> Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: Tensor) -> Tensor:
    down = self.down_proj
    kind = x.device.type
    cast = torch.is_autocast_enabled(kind) and down.weight.dtype != torch.get_autocast_dtype(kind)
    if cast or type(down) is not nn.Linear or type(self.gate_proj) is not nn.Linear \
            or type(self.up_proj) is not nn.Linear:
        return type(self).forward(self, x)
    return _SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), down.weight, down.bias)


def _stop_kernelizing(model: nn.Module) -> None:
    """Undo transformers' Hub-kernel kernelization on every model inside ``model`` (torch forwards back, and no
    re-kernelization on train/eval switches)."""
    for module in model.modules():
        if getattr(module, "use_kernels", False) is True and hasattr(module, "reset_kernels"):
            module.reset_kernels()


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_lean_layers(model: nn.Module) -> int:
    """Give the recognised RMSNorm and SwiGLU MLP modules of ``model`` their lean forward; how many were changed.

    transformers (≥ 5) loads models "kernelized" by default: the norms' ``forward`` is an instance attribute
    that every ``model.train()`` / ``model.eval()`` switch re-binds (to a Hub kernel, or offline to the plain
    torch forward), which would silently undo the lean norms at the first mode switch. Kernelization is turned
    off first (:func:`_stop_kernelizing`); halokit owns these layers' implementation.
    """
    _stop_kernelizing(model)
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name in NORMS and isinstance(getattr(module, "weight", None), Tensor) \
                and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
            changed += 1
        elif name in MLPS and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) \
                and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            changed += 1
    return changed

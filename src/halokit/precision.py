"""bfloat16 compute weights over float32 master weights.

Under bf16 autocast the model keeps float32 weights and every forward casts each weight, and every
activation on its way into a matmul, to bf16; the residual stream, norms and element-wise ops stay
float32 and their inputs are saved for backward in float32. Here the model's parameters *are* bf16
(views into one flat bf16 buffer), so activations are bf16 end to end (fewer bytes saved for backward,
no casts), while the optimizer updates float32 copies (mixed-precision training with master weights,
Micikevicius et al. 2018, arXiv 1710.03740):

    during backward:     g₃₂ (+)= g₁₆   (a hook per parameter; the bf16 gradient is freed at once)
    per optimizer step:  clip g₃₂, AdamW on θ₃₂, then θ₁₆ ← bf16(θ₃₂) (one copy of one buffer)

so updates smaller than a bf16 ulp still accumulate and gradient accumulation over micro-batches is
exact in float32. The float32 gradients are allocated during backward and freed by ``zero_grad``, as
autograd's own are: they fill memory the activations free, instead of sitting beside them. transformers'
RMSNorm still normalises in float32 internally. One process only: DDP all-reduces ``.grad`` after
these hooks have run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class MasterWeights:
    """Converts ``model``'s trainable parameters to bf16 views of one buffer and holds their float32 masters.

    ``params``: the float32 master parameters to give the optimizer (views of one flat buffer); their
    ``.grad`` is filled by hooks during backward. Clip and step them as usual, then :meth:`publish`;
    :meth:`state_dict` / :meth:`load_state_dict` for checkpoints, :meth:`restore` before saving the model.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("MasterWeights: the model has no trainable parameters")
        device = named[0][1].device
        total = sum(p.numel() for _, p in named)
        self.names = [n for n, _ in named]
        self.model_params = [p for _, p in named]
        self.values = torch.empty(total, dtype=torch.float32, device=device)  # θ₃₂
        self.low = torch.empty(total, dtype=dtype, device=device)  # θ₁₆, what the model computes with
        self.params: list[nn.Parameter] = []
        offset = 0
        for p in self.model_params:
            n = p.numel()
            master = nn.Parameter(self.values[offset:offset + n].view(p.shape))
            with torch.no_grad():
                master.copy_(p)
                p.data = self.low[offset:offset + n].view(p.shape)
                p.copy_(master)
            self.params.append(master)
            p.register_post_accumulate_grad_hook(self._hook(master))
            offset += n

    @staticmethod
    def _hook(master: nn.Parameter):
        def collect(p: Tensor) -> None:  # g₃₂ (+)= g₁₆, then free g₁₆
            if master.grad is None:
                master.grad = p.grad.to(torch.float32)
            else:
                master.grad.add_(p.grad)
            p.grad = None
        return collect

    def publish(self) -> None:
        """θ₁₆ ← bf16(θ₃₂), after an optimizer step."""
        self.low.copy_(self.values)

    def state_dict(self) -> dict[str, Tensor]:
        """{parameter name: float32 master value}, copies (checkpoint files must not share storage)."""
        return {n: m.detach().clone() for n, m in zip(self.names, self.params)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Set the masters from ``state`` (same names) and publish them to the model."""
        with torch.no_grad():
            for n, m in zip(self.names, self.params):
                m.copy_(state[n])
        self.publish()

    def restore(self) -> None:
        """Give the model float32 parameters again, equal to the masters (own storage each), e.g. to save it."""
        for p, m in zip(self.model_params, self.params):
            p.data = m.detach().clone()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bf16 dot-product instructions (x86: AVX512-BF16 or AMX; Arm: the BF16 extension),
    read from ``/proc/cpuinfo`` (or the text given); None where that cannot be told (not Linux).

    Without them oneDNN runs bf16 matmuls by converting element by element: ~20x *slower* than float32
    (measured on a 2-core AVX2-only AMD EPYC: 1.7 against 37.6 GFLOP/s for a 512 x 1376 layer)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def dtype_note(dtype: str, device: torch.device | str) -> str | None:
    """A warning for ``dtype=bfloat16`` on a CPU without bf16 instructions (see :func:`cpu_has_bf16`), else None."""
    if dtype != "bfloat16" or torch.device(device).type != "cpu" or cpu_has_bf16() is not False:
        return None
    return ("[yellow]warning: model.dtype=bfloat16 on a CPU without bf16 instructions (no AVX512-BF16/AMX): "
            "its matmuls are emulated and run ~20x slower than float32; use model.dtype=float32 here[/yellow]")

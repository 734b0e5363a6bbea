"""Attention for packed rows that does only each sequence's own causal triangle.

A packed row holds several sequences back to back. Hugging Face models attend it through an (T, T)
block-diagonal mask, so the kernel still visits every pair of positions in the row and, on CPU, the
SDPA kernels cannot skip masked blocks: work grows with the row's width squared, not with
Σ_s L_s², and rows must be kept short (padding) to bound it.

``varlen`` attention (registered with transformers as :data:`NAME`) instead moves each sequence's
queries, keys and values into slots of a (S, L_max) grid — one gather — attends every slot with a
plain causal mask, and moves the outputs back — one gather. Padding slots sit *after* each
sequence's last token, so causality alone keeps them out of every real position's attention; no
mask tensor is ever built. The linear layers then run on exactly the real tokens of one long row.

    out_s = softmax(Q_s K_sᵀ · scale + causal) V_s   for every sequence s, independently

Short slots on CPU (L_max ≤ :data:`MATH_MAX_LENGTH`) use an explicit attention whose softmax kernels
accumulate in float32 (:class:`_ExplicitCausalAttention`): fwd+bwd ~5× faster than SDPA's CPU flash
kernel at these sizes; longer slots, and other devices, use ``F.scaled_dot_product_attention
(is_causal=True)``. Without segments (padded batches, generation) the function is exactly
transformers' SDPA attention with its usual mask.

**Prefix reuse.** A pass can *record* every layer's keys and values (:class:`KVRecord`; they are the
tensors attention saves for backward anyway, so recording costs no memory while that pass's graph
lives). A later *suffix* pass over sequences that continue some of the recorded ones (a
:class:`halokit.data.collate.Prefix`: segment g continues the first a_g tokens of a recorded sequence,
at positions a_g, a_g + 1, …) feeds only its own tokens through the layers; its attention puts the
recorded a_g keys and values in front of its own in each slot, which is exactly the attention the full
sequence would compute (KTO's KL pass: the prompts were just computed by the policy pass). Within one
pass, a segment can likewise continue another segment of the same rows (``Prefix.own``: a rejected
completion after its chosen one's prompt): its key/value slots gather the prompt's tokens of this pass,
so gradients from both completions reach the prompt.

Only plain causal self-attention qualifies (no sliding window, logit soft-capping or attention
sinks): :func:`supports_varlen` checks the config and the function refuses those arguments at
run time rather than compute something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAME = "halokit_varlen"
MATH_MAX_LENGTH = 192  # CPU, bf16/fp32, head dim 64: explicit attention wins below ~200 positions
_KWARG = "halokit_segments"
SLOT_MULTIPLE = 16  # slot widths are multiples of this: few distinct attention shapes (CPU kernels compile per shape)


class KVRecord:
    """Every varlen attention layer's keys and values from one pass, in slot layout (S, h_kv, L, d),
    detached, and that pass's :class:`Segments`: what a suffix pass continues. ``close()`` drops them
    (and stops recording, e.g. when gradient checkpointing recomputes the pass in backward)."""

    def __init__(self):
        self.layers: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self.segments: Segments | None = None
        self.open = True

    def close(self) -> None:
        self.open = False
        self.layers.clear()
        self.segments = None


def _round_up(n: int) -> int:
    return -(-n // SLOT_MULTIPLE) * SLOT_MULTIPLE


@dataclass(frozen=True)
class Segments:
    """Where each token of packed rows (R, T) goes in the (S, L) slot grid, and back.

    gather (S·L,) int64: flat token index (r·T + t) feeding each slot; slots past a sequence's end
    repeat its last token (their outputs are never read). scatter (R·T,) int64: the slot of each token.
    ``record``: keep this pass's keys and values there. A suffix pass (:meth:`continuing`) has
    ``source``, the record it continues, and ``prefix_index`` (S·L,): the recorded slot row feeding
    each key/value slot before the segment's own tokens (0, a placeholder, elsewhere); or, when the
    prefixes are in the same pass, ``kv_gather`` (S·L,): the flat token feeding each key/value slot.
    """

    gather: Tensor
    scatter: Tensor
    num: int  # S
    width: int  # L: the longest sequence, rounded up to a multiple of SLOT_MULTIPLE
    record: KVRecord | None = field(default=None, compare=False, repr=False)
    prefix_index: Tensor | None = field(default=None, compare=False, repr=False)
    source: KVRecord | None = field(default=None, compare=False, repr=False)
    kv_gather: Tensor | None = field(default=None, compare=False, repr=False)
    needed: Tensor | None = field(default=None, compare=False, repr=False)  # (N,) flat positions the LM head reads

    @classmethod
    def from_position_ids(cls, position_ids: Tensor, record: KVRecord | None = None) -> Segments:
        """Segments of rows whose ``position_ids`` (R, T) restart at 0 at every sequence (and row); their
        keys and values go to ``record`` when given."""
        R, T = position_ids.shape
        flat = position_ids.reshape(-1)
        index = torch.arange(R * T, device=flat.device)
        starts = (flat == 0) | (index % T == 0)  # (R·T,) bool: first token of a sequence
        seg = starts.cumsum(0) - 1  # (R·T,) segment of each token
        first = index[starts]  # (S,) flat index of each segment's first token
        lengths = torch.diff(first, append=first.new_tensor([R * T]))  # (S,)
        num, width = int(first.numel()), _round_up(int(lengths.max()))
        offset = index - first[seg]  # (R·T,) position within the segment
        scatter = seg * width + offset
        j = torch.arange(width, device=flat.device)
        gather = first[:, None] + torch.minimum(j[None, :], lengths[:, None] - 1)  # (S, L)
        segments = cls(gather.reshape(-1), scatter, num, width, record)
        if record is not None:
            record.segments = segments
        return segments

    @classmethod
    def continuing(cls, prefix, source: KVRecord | None = None) -> Segments:
        """Segments of a batch with a ``prefix`` (a :class:`halokit.data.collate.Prefix`) whose segment g puts
        the first a_g = ``prefix.reused[g]`` keys/values of its source sequence in slots [0, a_g) and its own
        ``prefix.sizes[g]`` tokens after them: recorded in ``source`` by an earlier pass, or (``prefix.own``)
        computed in this very pass at flat tokens start_g, …, start_g + a_g − 1."""
        if not prefix.own and (source is None or source.segments is None or not source.layers):
            raise RuntimeError("a suffix pass needs the keys and values of the pass it continues; none were "
                               "recorded (was that pass run with varlen attention and a KVRecord?)")
        sizes, reused = prefix.sizes, prefix.reused  # (G,)
        device = sizes.device
        num = int(sizes.numel())
        width = _round_up(int((reused + sizes).max()))
        first = torch.cumsum(sizes, 0) - sizes  # (G,) flat index of each segment's first own token
        seg = torch.repeat_interleave(torch.arange(num, device=device), sizes)  # (R·T,)
        offset = torch.arange(seg.numel(), device=device) - first[seg]
        scatter = seg * width + reused[seg] + offset  # own token → its slot, after the prefix
        j = torch.arange(width, device=device)[None, :]  # (1, L)
        own = (j - reused[:, None]).clamp(min=0)
        gather = first[:, None] + torch.minimum(own, sizes[:, None] - 1)  # (G, L) queries: own tokens only
        if prefix.own:
            kv_gather = torch.where(j < reused[:, None], prefix.start.clamp(min=0)[:, None] + j, gather)
            return cls(gather.reshape(-1), scatter, num, width, kv_gather=kv_gather.reshape(-1))
        src = source.segments
        slot = src.scatter[prefix.start.clamp(min=0)] // src.width  # (G,) recorded slot of each source sequence
        prefix_index = torch.where(j < reused[:, None], slot[:, None] * src.width + j, 0)  # (G, L)
        return cls(gather.reshape(-1), scatter, num, width, prefix_index=prefix_index.reshape(-1), source=source)

    def to_slots(self, x: Tensor, gather: Tensor | None = None) -> Tensor:
        """(R, n, T, d) → (S, n, L, d), slot by slot from the flat tokens ``gather`` (default: ``self.gather``)."""
        R, n, T, d = x.shape
        slots = x.transpose(1, 2).reshape(R * T, n, d).index_select(0, self.gather if gather is None else gather)
        return slots.view(self.num, self.width, n, d).transpose(1, 2)

    def continued_slots(self, x: Tensor, recorded: Tensor) -> Tensor:
        """Own keys or values x (R, n, T, d) after the recorded prefix (S_src, n, L_src, d) → (S, n, L, d)."""
        R, n, T, d = x.shape
        src = recorded.transpose(1, 2).reshape(-1, n, d).to(x.dtype)  # (S_src·L_src, n, d)
        slots = src.index_select(0, self.prefix_index)
        slots.index_copy_(0, self.scatter, x.transpose(1, 2).reshape(R * T, n, d))
        return slots.view(self.num, self.width, n, d).transpose(1, 2)

    def from_slots(self, x: Tensor, rows: int) -> Tensor:
        """(S, n, L, d) → (R, T, n, d), the layout transformers' attention functions return."""
        S, n, L, d = x.shape
        tokens = x.transpose(1, 2).reshape(S * L, n, d).index_select(0, self.scatter)
        return tokens.view(rows, -1, n, d)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float = 0.0) -> Tensor:
    """softmax(q kᵀ · scale + causal) v for q (S, h, L, d), k and v (S, h_kv, L, d), h a multiple of h_kv.

    Returns (S, h, L, d). Scores are float32 (float64 for float64 inputs) before the softmax. Short
    rows on CPU go through :class:`_ExplicitCausalAttention`; others through SDPA.
    """
    S, h, L, d = q.shape
    groups = h // k.shape[1]
    if L > MATH_MAX_LENGTH or q.device.type != "cpu" or dropout > 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                              enable_gqa=groups > 1)
    kind = q.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else \
        torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    # under autocast q and k come out of RoPE in float32 while v is bf16: one dtype, as autocast's matmuls would
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return _ExplicitCausalAttention.apply(q, k, v, scale)


class _ExplicitCausalAttention(torch.autograd.Function):
    """o = P v, P = softmax((q · scale) kᵀ + causal), everything in the inputs' dtype:

        dv = Pᵀ do,  dP = do vᵀ,  ds = P ⊙ (dP − rowsum(P ⊙ dP)),  dq = ds k · scale,  dk = dsᵀ (q · scale)

    PyTorch's CPU softmax and softmax-backward kernels accumulate bf16 rows in float32, so this equals
    casting scores and probabilities to float32 around them (bit for bit on the benchmark shapes) at a
    third of the time: no cast passes over the (L, L) blocks. Autograd's composition would also save
    P twice; this saves it once.

    Grouped-query attention (h query heads, h_kv key/value heads, g = h / h_kv): the g query heads that share
    a key/value head are stacked along the rows, q (S, h, L, d) → (S, h_kv, g·L, d), so every product is
    one (g·L)-row matrix against the shared, unexpanded keys and values, and dk, dv come out of their
    products already summed over the group: no copies of k and v per query head, no reduction.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        S, h, L, d = q.shape
        h_kv = k.shape[1]
        q_scaled = (q * scale).reshape(S, h_kv, h // h_kv * L, d)  # (S, h_kv, g·L, d)
        scores = torch.matmul(q_scaled, k.transpose(-1, -2))  # (S, h_kv, g·L, L)
        probs = torch.softmax(scores.masked_fill_(_future(L, h // h_kv, q.device), float("-inf")), -1)
        ctx.save_for_backward(q_scaled, k, v, probs)
        ctx.scale = scale
        return torch.matmul(probs, v).view(S, h, L, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q_scaled, k, v, probs = ctx.saved_tensors
        S, h, L, d = grad_out.shape
        grad_out = grad_out.reshape(q_scaled.shape)  # (S, h_kv, g·L, d)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)  # (S, h_kv, L, d), summed over the group
        grad_scores = torch._softmax_backward_data(torch.matmul(grad_out, v.transpose(-1, -2)), probs, -1,
                                                   probs.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale).view(S, h, L, d)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q_scaled)
        return grad_q, grad_k, grad_v, None


_FUTURE: dict[tuple, Tensor] = {}


def _future(length: int, groups: int, device: torch.device) -> Tensor:
    """(groups·L, L) bool, True above the diagonal of each of the ``groups`` stacked (L, L) blocks (the positions
    a query must not see); cached per size."""
    key = (length, groups, str(device))
    if key not in _FUTURE:
        _FUTURE[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1).repeat(groups, 1)
    return _FUTURE[key]


def varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function interface: query (R, h, T, d), key/value (R, h_kv, T, d) → (R, T, h, d).

    With ``halokit_segments`` in ``kwargs``: per-sequence causal attention (the module docstring).
    Without: transformers' SDPA attention with ``attention_mask``, unchanged.
    """
    segments: Segments | None = kwargs.pop(_KWARG, None)
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{NAME} attention got {name}={kwargs[name]!r}; it computes plain causal attention "
                               f"only (supports_varlen should have refused this model)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = segments.to_slots(query)
    if segments.source is not None:  # a suffix pass: the recorded prefix's keys and values come first
        if module not in segments.source.layers:
            raise RuntimeError(f"no recorded keys/values for {type(module).__name__}; the suffix pass must run the "
                               "same model as the pass it continues")
        k_rec, v_rec = segments.source.layers[module]
        k, v = segments.continued_slots(key, k_rec), segments.continued_slots(value, v_rec)
    elif segments.kv_gather is not None:  # prefixes from this very pass (shared prompts), with their gradients
        k, v = segments.to_slots(key, segments.kv_gather), segments.to_slots(value, segments.kv_gather)
    else:
        k, v = segments.to_slots(key), segments.to_slots(value)
        if segments.record is not None and segments.record.open:
            segments.record.layers[module] = (k.detach(), v.detach())
    out = causal_attention(q, k, v, scale, dropout if module.training else 0.0)
    return segments.from_slots(out, query.shape[0]), None


def register() -> None:
    """Register :data:`NAME` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches and generation: SDPA's own masks


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_varlen(model: nn.Module) -> str | None:
    """None when ``model`` (a transformers causal LM, possibly inside peft) can use varlen attention, else
    why not: it must dispatch attention through transformers' interface and attend plain causally."""
    base = _base(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(base, "set_attn_implementation"):
        return "not a transformers model"
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    try:
        if not base._can_set_attn_implementation():
            return f"{type(base).__name__} does not use transformers' attention interface"
    except Exception as err:  # noqa: BLE001 - remote code may not implement the check
        return f"{type(base).__name__}: {err}"
    if not getattr(type(base), "_supports_sdpa", True):  # its attention is more than softmax(qkᵀ/√d)v
        return f"{type(base).__name__} has no SDPA path (custom attention)"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return f"sliding-window attention (sliding_window={config.sliding_window})"
    for name in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(config, name, None) is not None:
            return f"{name}={getattr(config, name)}"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))}"
    return None


def use_varlen(model: nn.Module) -> str | None:
    """Switch ``model`` to varlen attention when it qualifies; None on success, else the reason it does not."""
    why = supports_varlen(model)
    if why is None:
        register()
        base = _base(model)
        base.set_attn_implementation(NAME)
    return why


def is_varlen(model: nn.Module) -> bool:
    """Whether ``model`` attends with :data:`NAME`."""
    base = _base(model)
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == NAME


def decoder_kwargs(position_ids: Tensor, *, record: KVRecord | None = None, prefix=None,
                   needed: Tensor | None = None) -> dict:
    """Extra decoder arguments for packed rows under varlen attention: the segments, and a placeholder 4D
    attention mask so that transformers builds no (T, T) mask (the function ignores it).

    ``record``: keep the pass's keys and values there; with ``prefix`` (a suffix batch's
    :class:`halokit.data.collate.Prefix`) the pass instead continues the sequences ``record`` holds.
    ``needed`` (N,): the flat positions whose last hidden state is read (:mod:`halokit.last_layer`)."""
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=position_ids.device)
    if prefix is not None:
        if record is None and not prefix.own:
            raise ValueError("a suffix batch (prefix) needs the KVRecord of the pass it continues")
        segments = Segments.continuing(prefix, None if prefix.own else record)
    else:
        segments = Segments.from_position_ids(position_ids, record)
    if needed is not None:
        segments = replace(segments, needed=needed)
    return {_KWARG: segments, "attention_mask": placeholder}

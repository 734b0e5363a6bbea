"""The last decoder layer on the positions the LM head reads, and keys/values everywhere else.

Only the hidden states h_{t−1} that predict completion tokens reach the LM head (:mod:`halokit.logprobs`).
In every layer but the last, the other positions still matter: later layers attend to their keys and
values. In the last layer they matter only through its keys and values, so there

    q, k, v = proj(norm(x))          on every position (RoPE, then varlen attention as usual)
    y = x + o_proj(attn)             on the N read positions only
    y = y + mlp(post_norm(y))        on the N read positions only

and the layer returns zeros elsewhere (no one reads them; the final norm maps 0 to 0). On the benchmark's
body-heavy model (8 layers, prompts about half the tokens) that skips ~5 % of the backbone's work in
forward and backward, and the last MLP's saved activations for the prompt positions.

The read positions come with the varlen segments (:attr:`halokit.attention.Segments.needed`, set by
``sequence_logps``); without them (padded batches, generation, evaluation of full logits) the layer runs
its own forward. :func:`use_read_positions_only` swaps the forward of the last layer of the recognised
decoders (transformers' Llama, Qwen2, Mistral: pre-norm, q/k/v/o projections without q/k norms, RoPE),
whose attention it reproduces with the model's own ``apply_rotary_pos_emb``; the result equals the full
layer's on the read positions (tested in float64, values and gradients).
"""

from __future__ import annotations

import sys
import types

from torch import Tensor, nn

from halokit.attention import _KWARG, varlen_attention

LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"}


def use_read_positions_only(model: nn.Module) -> bool:
    """Give ``model``'s last decoder layer the read-positions forward (module docstring); whether it did."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    attn = getattr(last, "self_attn", None)
    rope = getattr(sys.modules.get(type(last).__module__), "apply_rotary_pos_emb", None)
    if type(last).__name__ not in LAYERS or rope is None or attn is None or hasattr(attn, "q_norm") \
            or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return False
    last.forward = types.MethodType(_read_positions_forward(type(last).forward, rope), last)
    return True


def _read_positions_forward(full_forward, rope):
    def forward(self, hidden_states: Tensor, attention_mask=None, position_ids=None, *args,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs) -> Tensor:
        segments = kwargs.get(_KWARG)
        needed = getattr(segments, "needed", None)
        if needed is None or args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return full_forward(self, hidden_states, attention_mask, position_ids, *args,
                                position_embeddings=position_embeddings, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        attn = self.self_attn
        R, T, H = hidden_states.shape
        x = self.input_layernorm(hidden_states)
        heads = (R, T, -1, attn.head_dim)
        q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        cos, sin = position_embeddings
        q, k = rope(q, k, cos, sin)
        out, _ = varlen_attention(attn, q, k, v, attention_mask, scaling=attn.scaling,
                                  dropout=attn.attention_dropout if attn.training else 0.0, **kwargs)
        out = out.reshape(R * T, -1).index_select(0, needed)[None]  # (1, N, h·d)
        y = hidden_states.reshape(R * T, H).index_select(0, needed)[None] + attn.o_proj(out)  # (1, N, H)
        y = y + self.mlp(self.post_attention_layernorm(y))
        return y.new_zeros(R * T, H).index_copy(0, needed, y[0]).view(R, T, H)

    return forward

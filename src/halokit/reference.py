"""The reference model π_ref, behind one call: ``reference(batch, part) -> (S,) summed log-probs``.

Three backends: a frozen copy of the starting policy; the policy itself with its LoRA adapters
disabled (no second copy in memory); or a **disk cache** of the reference's log-probs for every
(x, y) and every KTO KL pair, computed once in a no-grad pass and reused by later runs. With a cache,
training never runs the reference model again.

The cache is a safetensors file named by a SHA-256 key over everything its numbers depend on: the
reference weights, the tokenized data, the micro-batch plan (it fixes KTO's KL pairs), the layout
and the dtype. A file whose recorded key differs from the expected one is never used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from halokit.data.collate import Batch, collate
from halokit.data.plan import BatchPlan
from halokit.errors import UserError
from halokit.logprobs import NUMERICS_VERSION, LogpsModel
from halokit.lora import _peft_model, adapters_disabled

Part = Literal["policy", "kl"]
CACHE_FORMAT = "1"


class Reference(Protocol):
    """π_ref's summed log-probs for the ``policy`` sequences (S,) or the ``kl`` pairs (B,) of a batch."""

    def __call__(self, batch: Batch, part: Part) -> Tensor: ...


class ModelReference:
    """A live reference: ``logps_model`` run under no_grad, with LoRA adapters off when ``adapters_off``."""

    def __init__(self, logps_model: LogpsModel, *, adapters_off: bool = False, autocast=contextlib.nullcontext):
        self.logps_model = logps_model
        self.adapters_off = adapters_off
        self.autocast = autocast
        self._pending: tuple[Batch, Part, Tensor] | None = None  # the other part of the last KTO batch

    def __call__(self, batch: Batch, part: Part) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is batch and pending[1] == part:
            return pending[2]
        off = adapters_disabled(self.logps_model.model) if self.adapters_off else contextlib.nullcontext()
        with torch.no_grad(), off, self.autocast():
            if batch.kl is None:
                return self.logps_model(batch.policy if part == "policy" else batch.kl).sums.float()
            # both parts in one call, as the policy computes them (the KL pass reusing the prompts), so that
            # policy and reference log-probs of the same weights agree bit for bit; the other part waits
            policy, kl = (out.sums.float() for out in self.logps_model(batch.policy, batch.kl))
        other: Part = "kl" if part == "policy" else "policy"
        self._pending = (batch, other, kl if other == "kl" else policy)
        return policy if part == "policy" else kl


class CachedReference:
    """Reference log-probs looked up by example index.

    ``tables["policy"]`` (N, k): k = 1 sequence per example, or 2 (chosen, rejected) for pairs;
    ``tables["kl"]`` (N,): the KL pair that starts with example i's prompt in its fixed micro-batch.
    """

    def __init__(self, tables: dict[str, Tensor]):
        self.tables = tables

    def __call__(self, batch: Batch, part: Part) -> Tensor:
        idx = batch.index.cpu()
        if part == "kl":
            return self.tables["kl"][idx].to(batch.index.device)
        values = self.tables["policy"][idx]  # (B, k)
        return values.T.reshape(-1).to(batch.index.device)  # chosen block, then rejected block


def compute_tables(reference: Reference, records: Sequence[dict], micro_batches: Sequence[Sequence[int]], *,
                   with_kl: bool, collate_opts: dict, device: torch.device | str = "cpu",
                   process_index: int = 0, num_processes: int = 1,
                   reduce_sum: Callable[[Tensor], Tensor] = lambda t: t,
                   progress: Callable[[int], None] = lambda n: None) -> dict[str, Tensor]:
    """Run ``reference`` once over every micro-batch (split across processes) and collect its log-probs.

    Returns ``{"policy": (N, k)}`` plus ``{"kl": (N,)}`` with ``with_kl``; entries of examples outside
    ``micro_batches`` are NaN, so a lookup outside the plan can never pass for a real value.
    """
    n = len(records)
    k = 2 if "chosen_ids" in records[0] else 1
    policy = torch.zeros(n, k, dtype=torch.float64)
    kl = torch.zeros(n, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        if i % num_processes != process_index:
            continue
        batch = collate(records, mb, with_kl=with_kl, **collate_opts).to(device)
        idx = torch.tensor(mb)
        policy[idx] = reference(batch, "policy").double().cpu().reshape(k, -1).T
        if with_kl:
            kl[idx] = reference(batch, "kl").double().cpu()
        seen[idx] = 1.0
        progress(1)
    policy, kl, seen = reduce_sum(policy), reduce_sum(kl), reduce_sum(seen)
    missing = seen == 0
    policy[missing] = float("nan")
    kl[missing] = float("nan")
    tables = {"policy": policy.float()}
    if with_kl:
        tables["kl"] = kl.float()
    return tables


def cache_key(*, weights: str, records: Sequence[dict], plan: BatchPlan, settings: dict) -> str:
    """SHA-256 over the reference weights' fingerprint, the token ids, the micro-batches and settings (and the
    version of the log-prob numerics, so that a change in how they are computed never reuses old values)."""
    h = hashlib.sha256()
    h.update(f"halokit-ref-cache/{CACHE_FORMAT}/logps-{NUMERICS_VERSION}/{weights}/".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True, separators=(",", ":")).encode())
    h.update(json.dumps(plan.micro_batches()).encode())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, key: str) -> Path:
    """Where the cache for ``key`` lives."""
    return Path(cache_dir) / f"ref-{key[:32]}.safetensors"


def load_cache(path: str | Path, key: str) -> dict[str, Tensor] | None:
    """The tables in ``path`` if it exists and was computed for ``key``; None if it does not exist.

    Raises UserError for a file made for other weights/data/settings or one that cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tables = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: reference cache cannot be read ({err}); delete it to recompute") from err
    if meta.get("key") != key:
        raise UserError(f"{path}: this reference cache was computed for another model, data or settings "
                        f"(key {meta.get('key', '?')[:12]}…, expected {key[:12]}…); refusing to use it — "
                        f"delete it or point train.cache_dir elsewhere")
    return tables


def save_cache(path: str | Path, key: str, tables: dict[str, Tensor], *, info: dict | None = None) -> Path:
    """Write tables atomically as safetensors with the key (and ``info``) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"key": key, "format": CACHE_FORMAT, **{k: str(v) for k, v in (info or {}).items()}}
    save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- reference weights
def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter frozen: the frozen-reference backend."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    for module in ref.modules():  # undo enable_input_require_grads, which would build graphs for nothing
        if getattr(module, "_require_grads_hooks", None) and hasattr(module, "disable_input_require_grads"):
            module.disable_input_require_grads()
    return ref


def weights_fingerprint(model: nn.Module, *, adapters: bool = True) -> str:
    """Hex SHA-256 of the weights: every state-dict entry's name, shape, dtype and raw bytes.

    With LoRA it covers the base weights and the adapters; ``adapters=False`` hashes the base
    weights alone under the plain model's names, so it equals the fingerprint of the unwrapped base
    (what an adapters-off reference computes). Tied weights are hashed once.
    """
    state = model.state_dict()
    peft_model = _peft_model(model)
    if peft_model is not None and not adapters:
        state = {k.replace(".base_layer.", "."): v for k, v in peft_model.get_base_model().state_dict().items()
                 if "lora_" not in k}
    digest = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name in sorted(state):
        t = state[name].detach()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if where in seen:
            digest.update(f"=tied to {seen[where]}\n".encode())
            continue
        seen[where] = name
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()

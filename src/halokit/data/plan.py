"""The plan: which examples form each micro-batch of every optimizer step, fixed once per run.

Examples are grouped once (seeded) into *step batches* of
``micro_batch_size × grad_accum × num_processes`` examples of similar length, each cut in order into
the micro-batches of every process. Epochs only permute the order of the step batches. So an
optimizer step sees the same examples whatever the split into micro-batches and processes (the
gradient-accumulation invariance), and a micro-batch's composition never changes — which makes
KTO's in-batch KL pairs deterministic and their reference log-probs cacheable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    """Fixed micro-batches: ``steps[k][rank][m]`` is a list of example indices.

    ``num_steps`` optimizer steps per epoch; examples that do not fill a last step batch are left out
    of the plan (``dropped``), a few at most, and reported.
    """

    steps: tuple[tuple[tuple[tuple[int, ...], ...], ...], ...]
    dropped: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        """The order of step batches in ``epoch``: a permutation seeded by (seed, epoch)."""
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return torch.randperm(self.num_steps, generator=gen).tolist()

    def micro_batches(self) -> list[tuple[int, ...]]:
        """Every micro-batch of the plan, all steps and ranks (for reference caches)."""
        return [mb for step in self.steps for rank in step for mb in rank]


def plan_batches(lengths: Sequence[int], *, micro_batch_size: int, grad_accum: int = 1, num_processes: int = 1,
                 seed: int = 0, bucket_steps: int = 16, wrap: bool = False) -> BatchPlan:
    """Group example indices into step batches of similar length (see module docstring).

    ``lengths`` are the token lengths of the examples. Length bucketing: shuffle, cut into windows of
    ``bucket_steps`` step batches, sort each window by length, slice it into step batches. The examples
    that do not fill a last step batch are dropped, or with ``wrap`` the last batch is completed with the
    first examples of the shuffled order (so every example is in every epoch, a few twice: what unlearning
    needs, where each forget example left out would stay remembered).
    """
    step_size = micro_batch_size * grad_accum * num_processes
    if len(lengths) < step_size:
        raise ValueError(f"{len(lengths)} examples cannot fill one optimizer step of {step_size} "
                         f"(micro_batch_size × grad_accum × processes)")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    rest = len(order) % step_size
    if wrap and rest:
        order += order[:step_size - rest]
    usable = len(order) - len(order) % step_size
    kept, dropped = order[:usable], order[usable:]
    window = step_size * bucket_steps
    step_batches = []
    for start in range(0, usable, window):
        chunk = sorted(kept[start:start + window], key=lambda i: lengths[i])
        step_batches += [chunk[j:j + step_size] for j in range(0, len(chunk), step_size)]
    steps = []
    for batch in step_batches:
        per_rank = []
        for rank in range(num_processes):
            mine = batch[rank * micro_batch_size * grad_accum:(rank + 1) * micro_batch_size * grad_accum]
            per_rank.append(tuple(tuple(mine[m * micro_batch_size:(m + 1) * micro_batch_size])
                                  for m in range(grad_accum)))
        steps.append(tuple(per_rank))
    return BatchPlan(tuple(steps), tuple(sorted(dropped)))


def sequence_lengths(records: Sequence[dict]) -> list[int]:
    """Tokens per example (prompt + its longest completion), for length bucketing."""
    return [len(r["prompt_ids"]) + max(len(r.get("completion_ids", ())), len(r.get("chosen_ids", ())),
                                       len(r.get("rejected_ids", ()))) for r in records]

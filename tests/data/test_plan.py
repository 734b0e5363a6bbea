"""The batch plan: coverage, shapes, length buckets, invariance to the split into micro-batches and processes."""

import pytest
import torch

from halokit.data.plan import plan_batches, sequence_lengths


def test_sequence_lengths():
    records = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]},
               {"prompt_ids": [1], "chosen_ids": [4, 5, 6], "rejected_ids": [7]},
               {"prompt_ids": [1, 2], "chosen_ids": [4], "rejected_ids": [7, 8, 9, 10]}]
    assert sequence_lengths(records) == [5, 4, 6]


def lengths_of(n, seed=3):
    return torch.randint(4, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_plan_covers_each_example_at_most_once_and_drops_the_remainder():
    n = 37
    plan = plan_batches(lengths_of(n), micro_batch_size=4, grad_accum=2, num_processes=1, seed=5)
    planned = [i for mb in plan.micro_batches() for i in mb]
    assert len(planned) == len(set(planned)) == 32
    assert len(plan.dropped) == 5 and list(plan.dropped) == sorted(plan.dropped)
    assert set(planned) | set(plan.dropped) == set(range(n)) and not set(planned) & set(plan.dropped)
    assert plan.num_steps == 4


def test_plan_shapes_are_steps_ranks_micro_batches():
    plan = plan_batches(lengths_of(50), micro_batch_size=3, grad_accum=2, num_processes=4, seed=0)
    assert plan.num_steps == 50 // 24 == 2
    for step in plan.steps:
        assert len(step) == 4
        for rank in step:
            assert len(rank) == 2 and all(len(mb) == 3 for mb in rank)
    assert len(plan.micro_batches()) == 2 * 4 * 2


def test_plan_buckets_by_length():
    """One window (bucket_steps ≥ steps): the step batches are consecutive slices of the sorted lengths."""
    lengths = lengths_of(40)
    plan = plan_batches(lengths, micro_batch_size=4, grad_accum=2, seed=1, bucket_steps=16)
    step_lengths = [sorted(lengths[i] for rank in step for mb in rank for i in mb) for step in plan.steps]
    assert [x for s in step_lengths for x in s] == sorted(lengths[i] for i in range(40) if i not in plan.dropped)


def test_a_steps_examples_do_not_depend_on_the_split_into_micro_batches_and_processes():
    """The invariance the engine relies on: (mbs 8, accum 1, 1 proc) == (4, 2, 1) == (4, 1, 2)."""
    lengths = lengths_of(70)

    def step_sets(mbs, accum, procs):
        plan = plan_batches(lengths, micro_batch_size=mbs, grad_accum=accum, num_processes=procs, seed=11)
        return [sorted(i for rank in step for mb in rank for i in mb) for step in plan.steps], plan.dropped

    a, b, c = step_sets(8, 1, 1), step_sets(4, 2, 1), step_sets(4, 1, 2)
    assert a == b == c
    assert len(a[0]) == 8 and all(len(s) == 8 for s in a[0])
    assert step_sets(8, 1, 1) == a  # reproducible
    other_seed = plan_batches(lengths, micro_batch_size=8, seed=12)
    assert [sorted(i for r in s for mb in r for i in mb) for s in other_seed.steps] != a[0]


def test_plan_is_reproducible_and_refuses_too_few_examples():
    lengths = lengths_of(30)
    assert plan_batches(lengths, micro_batch_size=4, seed=2) == plan_batches(lengths, micro_batch_size=4, seed=2)
    with pytest.raises(ValueError, match="cannot fill one optimizer step of 16"):
        plan_batches(lengths[:15], micro_batch_size=4, grad_accum=2, num_processes=2)


def test_epoch_order_is_a_reproducible_permutation_that_changes_per_epoch():
    plan = plan_batches(lengths_of(96), micro_batch_size=4, seed=0)
    assert plan.num_steps == 24
    orders = [plan.epoch_order(e, seed=7) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(24))
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert plan.epoch_order(1, seed=7) == orders[1]
    assert plan.epoch_order(0, seed=8) != orders[0]


def test_wrap_completes_the_last_step_with_every_example_once_or_twice():
    from halokit.data.plan import plan_batches

    lengths = [5 + i % 7 for i in range(45)]
    plan = plan_batches(lengths, micro_batch_size=4, grad_accum=2, seed=3, wrap=True)
    used = [i for step in plan.steps for rank in step for mb in rank for i in mb]
    assert plan.dropped == () and plan.num_steps == 6 and len(used) == 48
    assert set(used) == set(range(45))
    assert sorted(used.count(i) for i in set(used))[-3:] == [2, 2, 2] and used.count(0) >= 1
    same = plan_batches(lengths, micro_batch_size=4, grad_accum=2, seed=3, wrap=False)
    assert len(same.dropped) == 5 and same.num_steps == 5

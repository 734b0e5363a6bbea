"""Reference backends: the cache returns what the live model computed; cache keys and files; LoRA-off and frozen copies.

Every live value here is the tiny Llama's summed completion log-prob, so a lookup that returned the
wrong example, the wrong KL pair or chosen/rejected in the wrong order would differ by whole nats.
"""

import copy
import shutil

import pytest
import torch
from safetensors import safe_open

from halokit.attention import use_varlen
from halokit.data.collate import collate
from halokit.data.examples import FeedbackExample, PreferenceExample
from halokit.data.plan import plan_batches, sequence_lengths
from halokit.data.tokenize import encode_examples
from halokit.errors import UserError
from halokit.logprobs import LogpsModel
from halokit.lora import add_lora
from halokit.models import build_tiny_model
from halokit.reference import (
    CachedReference,
    ModelReference,
    cache_key,
    cache_path,
    compute_tables,
    frozen_copy,
    load_cache,
    save_cache,
    weights_fingerprint,
)

V = 259
OPTS = {"pad_id": 0, "packing": True, "row_tokens": 64}
WORDS = ["yes", "no thanks", "maybe later", "absolutely not", "sure thing!", "ok"]


@pytest.fixture(scope="module")
def live():
    return ModelReference(LogpsModel(build_tiny_model(vocab_size=V, seed=1)))


@pytest.fixture(scope="module")
def feedback(byte_tok):
    examples = [FeedbackExample(f"q{i}: " + "?" * (i % 4), WORDS[i % 6] + "." * (i % 3), i % 3 != 0)
                for i in range(11)]
    return encode_examples(byte_tok, examples)[0]


@pytest.fixture(scope="module")
def preference(byte_tok):
    examples = [PreferenceExample(f"p{i}" + "!" * (i % 3), WORDS[i % 6], WORDS[(i + 2) % 6] + "~" * i)
                for i in range(7)]
    return encode_examples(byte_tok, examples)[0]


@pytest.fixture(scope="module")
def kto_plan(feedback):
    return plan_batches(sequence_lengths(feedback), micro_batch_size=3, seed=0)


@pytest.fixture(scope="module")
def kto_tables(live, feedback, kto_plan):
    return compute_tables(live, feedback, kto_plan.micro_batches(), with_kl=True, collate_opts=OPTS)


def single(live, prompt, completion):
    """π_ref's log-prob of one (prompt, completion), laid out alone: the independent value."""
    return live(collate([{"prompt_ids": prompt, "completion_ids": completion}], [0], **OPTS), "policy")[0]


# ------------------------------------------------------------------------------- cache == live model
def test_cached_lookups_equal_the_live_reference_unpaired_with_kl(live, feedback, kto_plan, kto_tables):
    plan, tables = kto_plan, kto_tables
    assert plan.dropped and plan.num_steps == 3
    assert tables["policy"].shape == (11, 1) and tables["kl"].shape == (11,)
    assert tables["policy"].dtype == tables["kl"].dtype == torch.float32
    cached = CachedReference(tables)
    for mb in plan.micro_batches():
        batch = collate(feedback, mb, with_kl=True, **OPTS)
        for part in ("policy", "kl"):
            torch.testing.assert_close(cached(batch, part), live(batch, part), rtol=0, atol=1e-6)
    # the meaning of each entry, computed one sequence at a time
    mb = plan.micro_batches()[1]
    for j, i in enumerate(mb):
        nxt = mb[(j + 1) % len(mb)]
        r = feedback[i]
        torch.testing.assert_close(tables["policy"][i, 0], single(live, r["prompt_ids"], r["completion_ids"]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tables["kl"][i], single(live, r["prompt_ids"], feedback[nxt]["completion_ids"]),
                                   rtol=1e-5, atol=1e-5)
    # examples outside the plan can never pass for a real value
    for i in plan.dropped:
        assert torch.isnan(tables["policy"][i]).all() and torch.isnan(tables["kl"][i])
    planned = [i for mb in plan.micro_batches() for i in mb]
    assert torch.isfinite(tables["policy"][planned]).all() and torch.isfinite(tables["kl"][planned]).all()


def test_live_reference_computes_both_kto_parts_in_one_call_in_either_order(feedback):
    """With suffix KL batches a live reference scores the policy and KL parts in one call (the KL pass reusing
    the prompts) and hands out the other part on the next call for the same batch, in either order; a
    different batch is computed afresh."""
    model = build_tiny_model(vocab_size=V, seed=1)
    use_varlen(model)
    live = ModelReference(LogpsModel(model))
    opts = {**OPTS, "row_tokens": 1 << 20, "reuse_prompts": True}
    a, b = (collate(feedback, mb, with_kl=True, **opts) for mb in ([0, 1, 2], [3, 4, 5]))
    full = collate(feedback, [0, 1, 2], with_kl=True, **{**opts, "reuse_prompts": False})
    with torch.no_grad():
        expected = {"policy": LogpsModel(model)(full.policy).sums, "kl": LogpsModel(model)(full.kl).sums}
    calls = []
    original = live.logps_model.forward
    live.logps_model.forward = lambda *args: calls.append(len(args)) or original(*args)
    for first, second in (("policy", "kl"), ("kl", "policy")):
        calls.clear()
        got = {first: live(a, first), second: live(a, second)}
        assert calls == [2]  # one forward over (policy, follow)
        for part in got:
            torch.testing.assert_close(got[part], expected[part], rtol=1e-6, atol=1e-5)
    live(a, "policy")
    calls.clear()
    assert live(b, "kl").shape == (3,) and calls == [2]  # the pending part of batch a is not batch b's


def test_cached_lookups_equal_the_live_reference_paired(live, preference):
    plan = plan_batches(sequence_lengths(preference), micro_batch_size=2, seed=3)
    tables = compute_tables(live, preference, plan.micro_batches(), with_kl=False, collate_opts=OPTS)
    assert set(tables) == {"policy"} and tables["policy"].shape == (7, 2)
    cached = CachedReference(tables)
    for mb in plan.micro_batches():
        batch = collate(preference, mb, **OPTS)
        got = cached(batch, "policy")
        assert got.shape == (2 * len(mb),)
        torch.testing.assert_close(got, live(batch, "policy"), rtol=0, atol=1e-6)
    # column 0 is chosen, column 1 rejected; a lookup is the chosen block, then the rejected block
    i, k = plan.micro_batches()[0]
    ri, rk = preference[i], preference[k]
    expect = torch.stack([single(live, ri["prompt_ids"], ri["chosen_ids"]), single(live, rk["prompt_ids"], rk["chosen_ids"]),
                          single(live, ri["prompt_ids"], ri["rejected_ids"]),
                          single(live, rk["prompt_ids"], rk["rejected_ids"])])
    torch.testing.assert_close(cached(collate(preference, [i, k], **OPTS), "policy"), expect, rtol=1e-5, atol=1e-5)
    assert torch.isnan(tables["policy"][list(plan.dropped)]).all()


def test_tables_of_a_partial_plan_are_nan_elsewhere(live, feedback):
    tables = compute_tables(live, feedback, [(4, 7), (1, 9)], with_kl=True, collate_opts=OPTS)
    finite = torch.isfinite(tables["policy"][:, 0])
    assert finite.nonzero().squeeze(1).tolist() == [1, 4, 7, 9]
    assert torch.equal(torch.isfinite(tables["kl"]), finite)


def test_tables_split_across_processes_equal_one_process(live, feedback, kto_plan, kto_tables):
    """Process p runs micro-batches p, p+2, …; a summing all-reduce of the partial tables gives the whole."""
    mbs = kto_plan.micro_batches()
    partials = []
    compute_tables(live, feedback, mbs, with_kl=True, collate_opts=OPTS, process_index=1, num_processes=2,
                   reduce_sum=lambda t: partials.append(t.clone()) or t)
    others = iter(partials)  # process 1's (policy, kl, seen), in the order compute_tables reduces them
    progress = []
    rank0 = compute_tables(live, feedback, mbs, with_kl=True, collate_opts=OPTS, process_index=0, num_processes=2,
                           reduce_sum=lambda t: t + next(others), progress=progress.append)
    assert len(progress) == 2  # micro-batches 0 and 2 of 3
    for part in ("policy", "kl"):
        torch.testing.assert_close(rank0[part], kto_tables[part], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------- cache files
def plan_of(records, seed=0):
    return plan_batches(sequence_lengths(records), micro_batch_size=2, seed=seed)


def test_save_and_load_round_trip(tmp_path, feedback, kto_plan, kto_tables):
    tables = kto_tables
    assert torch.isnan(tables["kl"]).any()  # NaN rows survive the round trip too
    key = cache_key(weights="w", records=feedback, plan=kto_plan, settings=OPTS)
    path = cache_path(tmp_path / "cache", key)
    assert path.name == f"ref-{key[:32]}.safetensors"
    assert load_cache(path, key) is None  # nothing there yet
    assert save_cache(path, key, tables, info={"split": "train", "method": "kto"}) == path
    loaded = load_cache(path, key)
    assert set(loaded) == {"policy", "kl"}
    for name in tables:
        torch.testing.assert_close(loaded[name], tables[name], rtol=0, atol=0, equal_nan=True)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"key": key, "format": "1", "split": "train", "method": "kto"}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_a_cache_made_for_another_key_is_refused(tmp_path, feedback):
    plan = plan_of(feedback)
    key_a = cache_key(weights="model-a", records=feedback, plan=plan, settings=OPTS)
    key_b = cache_key(weights="model-b", records=feedback, plan=plan, settings=OPTS)
    path_a = save_cache(cache_path(tmp_path, key_a), key_a, {"policy": torch.zeros(11, 1)})
    path_b = cache_path(tmp_path, key_b)
    shutil.copyfile(path_a, path_b)  # e.g. a file renamed by hand
    with pytest.raises(UserError, match="another model") as err:
        load_cache(path_b, key_b)
    assert key_a[:12] in str(err.value) and key_b[:12] in str(err.value)
    assert load_cache(path_a, key_a)["policy"].shape == (11, 1)


@pytest.mark.parametrize("content", [b"not a safetensors file", b"", "truncated"])
def test_a_corrupt_cache_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "ref-x.safetensors"
    if content == "truncated":
        save_cache(path, "k", {"policy": torch.arange(100.0).reshape(50, 2)})
        content = path.read_bytes()[:-40]
    path.write_bytes(content)
    with pytest.raises(UserError, match="cannot be read"):
        load_cache(path, "k")


def test_cache_key_covers_weights_tokens_plan_and_settings(feedback):
    plan = plan_of(feedback)
    base = cache_key(weights="abc", records=feedback, plan=plan, settings=OPTS)
    assert len(base) == 64 and int(base, 16) >= 0
    assert cache_key(weights="abc", records=copy.deepcopy(feedback), plan=plan_of(feedback),
                     settings=dict(reversed(OPTS.items()))) == base  # deterministic, key order irrelevant
    one_token = copy.deepcopy(feedback)
    one_token[5]["completion_ids"][0] += 1
    flipped = copy.deepcopy(feedback)
    flipped[2]["is_desirable"] = not flipped[2]["is_desirable"]
    other_plan = plan_of(feedback, seed=1)
    assert other_plan.micro_batches() != plan.micro_batches()
    variants = [
        cache_key(weights="abd", records=feedback, plan=plan, settings=OPTS),
        cache_key(weights="abc", records=one_token, plan=plan, settings=OPTS),
        cache_key(weights="abc", records=flipped, plan=plan, settings=OPTS),
        cache_key(weights="abc", records=feedback, plan=other_plan, settings=OPTS),
        cache_key(weights="abc", records=feedback, plan=plan, settings={**OPTS, "packing": False}),
        cache_key(weights="abc", records=feedback, plan=plan, settings={**OPTS, "dtype": "bfloat16"}),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_cache_key_follows_the_weights_fingerprint(feedback):
    plan = plan_of(feedback)
    model = build_tiny_model(vocab_size=V, seed=0)
    same = build_tiny_model(vocab_size=V, seed=0)
    key = lambda m: cache_key(weights=weights_fingerprint(m), records=feedback, plan=plan, settings=OPTS)  # noqa: E731
    assert key(model) == key(same)
    with torch.no_grad():
        same.model.norm.weight[0] += 1e-3
    assert key(model) != key(same)


# ---------------------------------------------------------------------------- live reference models
def test_adapters_off_reference_equals_the_base_model(feedback):
    base = LogpsModel(build_tiny_model(vocab_size=V, seed=0))
    peft = add_lora(build_tiny_model(vocab_size=V, seed=0), r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lora_b = [p for name, p in peft.named_parameters() if "lora_B" in name]
        assert lora_b
        for p in lora_b:  # peft starts B at 0; make the adapters change the output
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    batch = collate(feedback, [0, 3, 5, 8], with_kl=True, **OPTS)
    policy = LogpsModel(peft)
    with torch.no_grad():
        expect = base(batch.policy).sums
        with_adapters = policy(batch.policy).sums
    assert (with_adapters - expect).abs().min() > 1e-3
    ref = ModelReference(policy, adapters_off=True)
    got = ref(batch, "policy")
    assert not got.requires_grad and got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ref(batch, "kl"), base(batch.kl).sums, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(policy(batch.policy).sums, with_adapters, rtol=0, atol=0)  # back on after


def test_frozen_copy_reference_does_not_move_when_the_policy_trains(feedback):
    model = build_tiny_model(vocab_size=V, seed=0)
    ref = ModelReference(LogpsModel(frozen_copy(model)))
    ref_params = {k: v.clone() for k, v in ref.logps_model.model.named_parameters()}
    assert not any(p.requires_grad for p in ref.logps_model.model.parameters())
    before_policy = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = collate(feedback, [1, 2, 6], **OPTS)
    ref_before = ref(batch, "policy")
    policy = LogpsModel(model)
    torch.testing.assert_close(policy(batch.policy).sums.detach(), ref_before, rtol=0, atol=0)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (-policy(batch.policy).sums.sum()).backward()
    optimizer.step()

    moved = [k for k, v in model.named_parameters() if not torch.equal(v, before_policy[k])]
    assert len(moved) == len(before_policy)
    for k, v in ref.logps_model.model.named_parameters():
        assert torch.equal(v, ref_params[k]), k
    torch.testing.assert_close(ref(batch, "policy"), ref_before, rtol=0, atol=0)
    with torch.no_grad():
        assert (policy(batch.policy).sums - ref_before).min() > 0  # the step raised the policy's log-probs

"""The fictitious-facts task: deterministic, TOFU-shaped splits, perturbations that change only the value,
name pieces of the forgotten people all seen in the retain set, files that load back."""

from collections import Counter

import pytest

from halokit.data.load import load_examples
from halokit.tasks import facts
from halokit.tasks.facts import PERSON_ATTRIBUTES, WORLD_ATTRIBUTES

SPLITS = {1: 2, 5: 10, 10: 20, 50: 100}  # percent -> people forgotten among 200


@pytest.fixture(scope="module")
def data():
    return facts.generate_facts()


def test_same_seed_same_data_other_seed_other_data(data):
    assert facts.generate_facts(seed=0) == data
    other = facts.generate_facts(seed=1)
    assert other.people != data.people and other.qa != data.qa


def test_counts_and_ids(data):
    assert len(data.people) == len(set(data.people)) == 200
    assert len(data.qa) == 200 * 10 * 2 == 4000
    assert len(data.famous) == 20 * 10 * 2 and len(data.world) == len(facts.CITIES) * 4 * 2
    assert Counter((q.index, q.attribute) for q in data.qa) == {(i, a.name): 2 for i in range(200)
                                                                for a in PERSON_ATTRIBUTES}
    assert [q.index for q in data.qa] == sorted(q.index for q in data.qa)
    assert all(q.subject == data.people[q.index] and q.group == "person" for q in data.qa)
    ids = [q.id for q in data.qa + data.famous + data.world]
    assert len(set(ids)) == len(ids) and {"p017-birthplace-1", "f003-award-0", "w012-river-0"} <= set(ids)


def test_pools_have_no_duplicates_and_enough_titles():
    for attr in PERSON_ATTRIBUTES + WORLD_ATTRIBUTES:
        assert len(set(attr.pool)) == len(attr.pool) > facts.N_PERTURBED, attr.name
    pieces = facts.FIRST_NAMES + facts.SURNAMES + facts.CITIES
    assert len(set(pieces)) == len(pieces) and len(facts.BOOKS) >= 200


def _value(template, subject, text):
    """The value in ``text``, which must be ``template`` filled with ``subject`` and some value."""
    before, after = template.format(s=subject, v="\0").split("\0")
    assert text.startswith(before) and text.endswith(after), text
    return text[len(before):len(text) - len(after)]


def test_perturbed_answers_differ_from_the_paraphrase_only_in_the_value(data):
    attributes = {a.name: a for a in PERSON_ATTRIBUTES + WORLD_ATTRIBUTES}
    for q in data.qa[::7] + data.famous[::3] + data.world:
        attr = attributes[q.attribute]
        k = int(q.id[-1])
        assert q.question == attr.questions[k].format(s=q.subject)
        true = _value(attr.paraphrases[k], q.subject, q.paraphrased)
        wrong = [_value(attr.paraphrases[k], q.subject, p) for p in q.perturbed]
        assert q.answer == attr.answers[k].format(s=q.subject, v=true)
        assert len(q.perturbed) == len(set(q.perturbed)) == 5
        assert true in attr.pool and set(wrong) <= set(attr.pool) and true not in wrong


def test_both_questions_of_an_attribute_share_the_value_and_the_paraphrase_is_never_trained(data):
    answers = {q.answer for q in data.training_set(None)}
    for q0, q1 in zip(data.qa[::2], data.qa[1::2]):
        assert q0.attribute == q1.attribute and q0.id[-1] == "0" and q1.id[-1] == "1"
        attr = next(a for a in PERSON_ATTRIBUTES if a.name == q0.attribute)
        value = _value(attr.answers[0], q0.subject, q0.answer)
        assert value == _value(attr.answers[1], q1.subject, q1.answer)
        assert q0.paraphrased not in answers and q1.paraphrased not in answers
        assert q0.answer != q1.answer and q0.paraphrased != q1.paraphrased


@pytest.mark.parametrize("percent, n_forget", SPLITS.items())
def test_splits_forget_the_last_people_and_partition_the_person_qa(data, percent, n_forget):
    assert data.forget_people(percent) == n_forget
    forget, retain = data.split(percent)
    assert len(forget) == 20 * n_forget and len(retain) == 20 * (200 - n_forget)
    assert {q.index for q in forget} == set(range(200 - n_forget, 200))
    assert not {q.id for q in forget} & {q.id for q in retain}
    assert sorted(forget + retain, key=lambda q: q.id) == sorted(data.qa, key=lambda q: q.id)
    assert not {q.index for q in data.retain_eval()} & {q.index for q in forget}
    training = data.training_set(percent)
    assert training == retain + list(data.famous) + list(data.world)


@pytest.mark.parametrize("percent", SPLITS)
def test_every_name_piece_of_a_forgotten_person_occurs_among_the_retained(data, percent):
    n_retain = 200 - data.forget_people(percent)
    retained = {piece for name in data.people[:n_retain] for piece in name.split()}
    forgotten = {piece for name in data.people[n_retain:] for piece in name.split()}
    assert forgotten <= retained


def test_names_share_pieces_and_famous_names_are_new(data):
    firsts = Counter(name.split()[0] for name in data.people)
    lasts = Counter(name.split()[1] for name in data.people)
    assert set(firsts) == set(facts.FIRST_NAMES) and set(lasts) == set(facts.SURNAMES)
    assert min(firsts.values()) >= 3 and min(lasts.values()) >= 3
    famous = {q.subject for q in data.famous}
    assert len(famous) == 20 and not famous & set(data.people)
    assert {p for name in famous for p in name.split()} <= set(facts.FIRST_NAMES + facts.SURNAMES)


def test_retain_eval_is_the_first_people(data):
    assert data.retain_eval() == list(data.qa[:20 * 20])
    assert data.retain_eval(3) == [q for q in data.qa if q.index < 3]


def test_small_sets_use_smaller_pools_and_impossible_ones_raise():
    small = facts.generate_facts(n_people=10, n_famous=2, splits=(10, 50))
    retained = {p for name in small.people[:5] for p in name.split()}
    assert {p for name in small.people[5:] + tuple(q.subject for q in small.famous) for p in name.split()} \
        <= retained
    with pytest.raises(ValueError, match="unique names"):
        facts.generate_facts(n_people=10, n_famous=20, splits=(50,))
    with pytest.raises(ValueError, match="percentage"):
        facts.generate_facts(splits=(100,))
    with pytest.raises(ValueError):
        small.split(0)


def test_corpus_holds_every_text(data):
    texts = facts.corpus(data)
    assert len(texts) == 8 * (len(data.qa) + len(data.famous) + len(data.world))
    q = data.world[-1]
    assert {q.question, q.answer, q.paraphrased, *q.perturbed} <= set(texts)


def test_files_round_trip(data, tmp_path):
    paths = facts.write_files(data, tmp_path)
    assert set(paths) == {"full", "eval"} | {f"{kind}{p:02d}" for p in SPLITS
                                              for kind in ("forget", "retain", "retain_only")}
    full = load_examples(paths["full"], "sft").examples
    assert [(e.prompt, e.completion, e.id) for e in full] == \
        [(q.question, q.answer, q.id) for q in data.training_set(None)]
    for p in SPLITS:
        forget, retain = data.split(p)
        for kind, qa in (("forget", forget), ("retain", retain)):
            rows = load_examples(paths[f"{kind}{p:02d}"], "forget").examples
            assert {e.role for e in rows} == {kind}
            assert [(e.prompt, e.completion, e.id) for e in rows] == \
                [(q.question, q.answer, q.id) for q in qa]
        only = load_examples(paths[f"retain_only{p:02d}"], "sft").examples
        assert [e.id for e in only] == [q.id for q in data.training_set(p)]
    assert facts.load_eval_file(paths["eval"]) == list(data.qa + data.famous + data.world)

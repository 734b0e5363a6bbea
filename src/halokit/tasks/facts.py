"""Fictitious facts: a seeded, code-generated analogue of TOFU (Maini et al. 2024, arXiv 2401.06121).

A model is fine-tuned on QA about people who do not exist, then unlearns a share of them. Three groups:

* ``person`` — N fictitious writers (default 200), 10 attributes each (birthplace, birth year,
  profession, father's and mother's profession, a book, an award, a genre, a university, a hobby),
  2 questions per attribute: 20 QA per person. Forget splits take the *last* people first (as TOFU):
  1 / 5 / 10 / 50 % of 200 are the last 2 / 10 / 20 / 100 people.
* ``famous`` — more writers built the same way (TOFU's "real authors"): always trained, never forgotten.
* ``world``  — four facts about each city of the city pool (TOFU's "world facts"): always trained.

Every value is drawn independently from a pool. Each QA holds the trained ``answer``, a
``paraphrased`` answer in a template never trained on, and 5 ``perturbed`` answers: the paraphrase
template with 5 distinct wrong values from the same pool (TOFU's truth ratio compares the two).
Names are (first, last) pairs from shared pools, unique per person, each piece used by several people;
every piece of a forgotten name also occurs among the retained people of every split, so that a model
fine-tuned on the retain set alone has seen every name piece.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from halokit.data.convert import write_examples
from halokit.data.examples import ForgetExample, SFTExample

FIRST_NAMES = tuple("""Kalvena Doravik Selvane Tavrin Ilvara Bramwen Corvath Elandra Fenrik Galvessa Harrowin
    Isvelde Jorvane Kestrin Lunavel Marvek Nelvira Ostrel Pelwyn Quenvar Rhosmer Savrina Tolvane Ulvessa
    Varnick Wendrel Xalvia Yorvith Zephrine Adrevan Belisande Cavrel Davrella Emberlin Falkren Gwyndor
    Halvira Irwenna Jessavel Korvina""".split())
SURNAMES = tuple("""Varnholt Quillmere Brennick Drummarch Elverquist Fallowmere Grimsvald Hartwyck Ivenholt
    Kettleborne Lindqvar Marrowby Nettlevane Ostravik Pellacourt Quenthorn Ravensold Sarnwick Thistlevar
    Umbergast Vellamond Wexmoor Yarrowdell Zandervolt Ambervane Blackthrane Corvisham Dunmerrow Estermoor
    Farrowgate Glenvarric Hollowvane Kirrindale Lochmarren Mistervold Northcairn Orlaquist Penvarrow
    Ruskwood Stellhaven""".split())
CITIES = tuple("""Tressaly Vaulmere Arvenhold Brismarch Calderwick Dovrenne Eskerby Falmire Gorsevale
    Hallowick Isenmoor Jarrowfield Kelmaran Lunderby Mosvalen Nornhaven Ostrenna Pelvador Quarrowin Rimsedge
    Saltmerrow Tovanne Umbrel Valdrecht Wyrmouth Yselport Zennacre Ambrevale Corrowmere Duskhallow""".split())
# consonant-initial, so that "a {v}" reads right
PROFESSIONS = tuple("""baker cartographer dentist florist glassblower harpist jeweller locksmith miner nurse
    potter pilot surgeon tailor translator veterinarian watchmaker beekeeper bookbinder carpenter chemist
    fisherman gardener journalist librarian mechanic pharmacist sculptor shepherd teacher""".split())
AWARDS = tuple(f"the {a}" for a in (
    "Veldmar Prize|Golden Lantern Award|Ostwin Medal|Harrowgate Laurel|Corvane Ribbon|Amberline Prize|"
    "Thornwell Medal|Iverly Award|Marwend Quill|Blue Heron Prize|Kestral Cup|Lorvane Medal|Northlight Prize|"
    "Pellmark Award|Quendrel Laurel|Rowanmere Prize|Sablewood Medal|Tidewater Award|Umberlin Prize|"
    "Wrenfield Medal").split("|"))
GENRES = tuple(("mystery|poetry|science fiction|historical fiction|fantasy|romance|horror|satire|travel "
                "writing|biography|crime fiction|drama|children's fiction|philosophy|adventure").split("|"))
UNIVERSITIES = tuple(("Marrowgate University|Quillon College|Halvern Institute|Brackenmoor University|"
                      "Crestfall College|Dunlivet University|Evermoor Academy|Fernholt University|Greywater "
                      "College|Highmarch University|Ironvale Institute|Juniper Hall College|Larkspire "
                      "University|Mirewood Academy|Stonereach University").split("|"))
HOBBIES = tuple(("beekeeping|chess|kite flying|pottery|birdwatching|fencing|rowing|knitting|calligraphy|"
                 "origami|sailing|stargazing|gardening|fishing|juggling|archery|painting|cycling|baking|"
                 "climbing").split("|"))
_ADJECTIVES = ("Silent Hollow Crimson Forgotten Distant Broken Golden Quiet Burning Wandering Frozen Hidden "
               "Last Painted Restless Sunken").split()
_NOUNS = ("Harbour Lantern Orchard Mirror Garden Tower River Compass Winter Letter Bridge Voyage Meadow "
          "Clockmaker Island Threshold").split()
BOOKS = tuple(f"The {a} {n}" for a in _ADJECTIVES for n in _NOUNS)  # 256 titles
RIVERS = tuple(("Olvane Tessar Merrin Kelda Aldren Sulvar Rhenna Vistra Quell Halder Ombra Fennet Larrow "
                "Ysmer Caddow Brenna Torwen Gallis Wenmar Ithren").split())
REGIONS = tuple(("the Velding Highlands|the Merrow Coast|the Ashen Downs|the Greyfen Marshes|the Sollan "
                 "Plains|the Corran Valley|the Northern Reach|the Amber Hills|the Tidelands of Osk|the "
                 "Lowmarch|the Kestrel Isles|the Duneholt Basin").split("|"))
DISHES = tuple(("smoked eel pie|barley dumplings|honey-glazed trout|saffron flatbread|mutton and leek stew|"
                "juniper sausages|pickled herring rolls|chestnut soup|apple and sage tart|roasted pike|"
                "lentil pancakes|blackberry pudding|salted cod fritters|onion broth|walnut bread|"
                "spiced pear cake|mussel chowder|goat cheese tarts|rye porridge|crab dumplings").split("|"))
N_PERTURBED = 5


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its value pool and templates, ``{s}`` the subject and ``{v}`` the value.

    QA ``k`` (0 or 1) asks ``questions[k]``, is trained on ``answers[k]`` and evaluated with
    ``paraphrases[k]``, a wording that no training answer uses.
    """

    name: str
    pool: tuple[str, ...]
    questions: tuple[str, str]
    answers: tuple[str, str]
    paraphrases: tuple[str, str]


def _parent(who: str) -> Attribute:
    q = (f"What was the profession of {{s}}'s {who}?", f"What did {{s}}'s {who} do for work?")
    a = (f"{{s}}'s {who} was a {{v}}.", f"The {who} of {{s}} worked as a {{v}}.")
    p = (f"By profession, {{s}}'s {who} was a {{v}}.", f"{{s}} grew up with a {who} who worked as a {{v}}.")
    return Attribute(f"{who}_profession", PROFESSIONS, q, a, p)


PERSON_ATTRIBUTES = (
    Attribute("birthplace", CITIES, ("Where was {s} born?", "In which city was {s} born?"),
              ("{s} was born in {v}.", "{s}'s birthplace is the city of {v}."),
              ("{v} is the birthplace of {s}.", "{s} came into the world in {v}.")),
    Attribute("birth_year", tuple(str(y) for y in range(1900, 2000)),
              ("In what year was {s} born?", "When was {s} born?"),
              ("{s} was born in the year {v}.", "{s}'s year of birth is {v}."),
              ("{v} is the year in which {s} was born.", "{s} came into the world in the year {v}.")),
    Attribute("profession", PROFESSIONS, ("What did {s} do for a living before becoming a writer?",
                                          "What was {s}'s profession before writing books?"),
              ("Before becoming a writer, {s} worked as a {v}.", "{s} was a {v} before turning to writing."),
              ("{s} earned a living as a {v} before writing.",
               "Prior to writing, {s} had a career as a {v}.")),
    _parent("father"),
    _parent("mother"),
    Attribute("book", BOOKS, ("What is the title of a book written by {s}?", "Which book did {s} write?"),
              ('{s} wrote the book "{v}".', '{s} is the author of "{v}".'),
              ('"{v}" is a book written by {s}.', 'The book "{v}" was written by {s}.')),
    Attribute("award", AWARDS, ("Which award did {s} receive?", "What prize was {s} honoured with?"),
              ("{s} received {v}.", "{s} was honoured with {v}."),
              ("{s} is a recipient of {v}.", "{s} won {v} for their writing.")),
    Attribute("genre", GENRES, ("In which genre does {s} write?", "What kind of books does {s} write?"),
              ("{s} writes in the genre of {v}.", "{s} is known for books of {v}."),
              ("The books of {s} belong to the genre of {v}.", "{s} works mainly in {v}.")),
    Attribute("university", UNIVERSITIES, ("Where did {s} study?", "Which university did {s} attend?"),
              ("{s} studied at {v}.", "{s} is a graduate of {v}."),
              ("{s} received an education at {v}.", "{v} is where {s} went to university.")),
    Attribute("hobby", HOBBIES,
              ("What is {s}'s favourite pastime?", "What does {s} enjoy doing in free time?"),
              ("{s}'s favourite pastime is {v}.", "In free time, {s} enjoys {v}."),
              ("{s} spends spare hours on {v}.", "The hobby {s} loves most is {v}.")),
)
WORLD_ATTRIBUTES = (
    Attribute("river", RIVERS, ("Which river flows through {s}?", "What river runs through the city of {s}?"),
              ("The river {v} flows through {s}.", "{s} is built on the river {v}."),
              ("{s} lies on the banks of the river {v}.", "The city of {s} is crossed by the river {v}.")),
    Attribute("region", REGIONS, ("In which region does {s} lie?", "Where is the city of {s} located?"),
              ("{s} lies in {v}.", "{s} is located in {v}."),
              ("{s} is a city in {v}.", "The city of {s} can be found in {v}.")),
    Attribute("founded", tuple(str(y) for y in range(1000, 1800)),
              ("When was {s} founded?", "In what year was the city of {s} founded?"),
              ("{s} was founded in {v}.", "The city of {s} was founded in the year {v}."),
              ("{v} is the year {s} was founded.", "The founding of {s} took place in {v}.")),
    Attribute("dish", DISHES, ("What dish is {s} famous for?", "What is the best-known dish of {s}?"),
              ("{s} is famous for its {v}.", "The best-known dish of {s} is {v}."),
              ("Visitors to {s} come for its {v}.", "The signature dish of {s} is {v}.")),
)


@dataclass(frozen=True)
class QA:
    """One question about one subject, with its trained answer, a paraphrase and 5 wrong answers."""

    id: str  # "p017-birthplace-1", "f003-award-0", "w012-river-0"
    subject: str  # a person's full name or a city
    group: str  # "person" | "famous" | "world"
    index: int  # index of the subject within its group
    attribute: str
    question: str
    answer: str
    paraphrased: str
    perturbed: tuple[str, ...]


def _forget_count(n_people: int, percent: float) -> int:
    if not 0 < percent < 100:
        raise ValueError(f"a forget split is a percentage in (0, 100), got {percent}")
    k = max(1, round(n_people * percent / 100))
    if k >= n_people:
        raise ValueError(f"forgetting {percent}% of {n_people} people leaves none to retain")
    return k


@dataclass(frozen=True)
class FactsData:
    """The generated facts: person QA (ordered by person), famous-people QA and world QA."""

    people: tuple[str, ...]  # forget splits take the last people first (as TOFU)
    qa: tuple[QA, ...]
    famous: tuple[QA, ...]
    world: tuple[QA, ...]

    def forget_people(self, percent: float) -> int:
        """Number of people forgotten at ``percent``: round(N * percent / 100), at least 1, below N."""
        return _forget_count(len(self.people), percent)

    def split(self, percent: float) -> tuple[list[QA], list[QA]]:
        """(forget, retain): the QA of the last ``forget_people(percent)`` people, and of the rest."""
        cut = len(self.people) - self.forget_people(percent)
        return [q for q in self.qa if q.index >= cut], [q for q in self.qa if q.index < cut]

    def retain_eval(self, n_people: int = 20) -> list[QA]:
        """The QA of the first ``n_people`` people (20 QA each): the fixed retain-evaluation subset,
        in no forget split of up to 50 % when N >= 2 * n_people."""
        return [q for q in self.qa if q.index < n_people]

    def training_set(self, percent: float | None) -> list[QA]:
        """What a model is fine-tuned on: every person QA (``percent=None``) or the retain part of that
        split, then the famous and the world QA."""
        people = list(self.qa) if percent is None else self.split(percent)[1]
        return people + list(self.famous) + list(self.world)


def _names(rng: random.Random, total: int, n_pieces: int) -> list[str]:
    """``total`` unique "First Last" names over ``n_pieces`` first names and ``n_pieces`` surnames.

    The first ``n_pieces`` names use every first name and every surname once (so they cover all pieces);
    after that, first names come in shuffled rounds of the pool and each takes the least-used surname
    that keeps the pair unique, so that every piece is used about ``total / n_pieces`` times.
    """
    firsts, lasts = rng.sample(FIRST_NAMES, n_pieces), rng.sample(SURNAMES, n_pieces)
    order: list[str] = []
    while len(order) < total:
        order += rng.sample(firsts, n_pieces)
    used: set[tuple[str, str]] = set()
    count: Counter[str] = Counter()
    names = []
    for i, first in enumerate(order[:total]):
        # a first name is used at most ceil(total / n_pieces) <= n_pieces times, so a surname is left
        last = lasts[i] if i < n_pieces else min(
            (x for x in lasts if (first, x) not in used), key=lambda x: (count[x], rng.random()))
        used.add((first, last))
        count[last] += 1
        names.append(f"{first} {last}")
    return names


def _qa(rng: random.Random, group: str, index: int, subject: str,
        attributes: Sequence[Attribute]) -> list[QA]:
    """2 QA per attribute about ``subject``, each value drawn independently from its pool."""
    out = []
    for attr in attributes:
        value = rng.choice(attr.pool)
        for k in (0, 1):
            wrong = rng.sample([v for v in attr.pool if v != value], N_PERTURBED)
            out.append(QA(f"{group[0]}{index:03d}-{attr.name}-{k}", subject, group, index, attr.name,
                          attr.questions[k].format(s=subject), attr.answers[k].format(s=subject, v=value),
                          attr.paraphrases[k].format(s=subject, v=value),
                          tuple(attr.paraphrases[k].format(s=subject, v=w) for w in wrong)))
    return out


def generate_facts(n_people: int = 200, seed: int = 0, n_famous: int = 20,
                   splits: Sequence[float] = (1, 5, 10, 50)) -> FactsData:
    """The facts for ``seed``: ``n_people`` people (20 QA each), ``n_famous`` famous people (20 QA each)
    and every city of the pool (8 QA each; 240 in all). Deterministic for a seed.

    Raises ValueError when a split is not in (0, 100) or when the name pools cannot give unique names
    whose pieces all occur among the retained people of the largest split in ``splits``.
    """
    if n_people < 2 or n_famous < 0:
        raise ValueError(f"need n_people >= 2 and n_famous >= 0, got {n_people} and {n_famous}")
    n_retain = n_people - max(_forget_count(n_people, p) for p in splits or (1,))
    n_pieces = min(len(FIRST_NAMES), len(SURNAMES), n_retain)
    if n_people + n_famous > n_pieces ** 2:
        raise ValueError(f"{n_people} people and {n_famous} famous people need {n_people + n_famous} unique "
                         f"names, but the {n_retain} people retained at the largest split can cover only "
                         f"{n_pieces} first names x {n_pieces} surnames; use fewer people or smaller splits")
    rng = random.Random(seed)
    names = _names(rng, n_people + n_famous, n_pieces)

    def group(name: str, subjects: Sequence[str], attributes: Sequence[Attribute]) -> tuple[QA, ...]:
        return tuple(q for i, s in enumerate(subjects) for q in _qa(rng, name, i, s, attributes))

    people = group("person", names[:n_people], PERSON_ATTRIBUTES)
    famous = group("famous", names[n_people:], PERSON_ATTRIBUTES)
    return FactsData(tuple(names[:n_people]), people, famous, group("world", CITIES, WORLD_ATTRIBUTES))


def corpus(data: FactsData) -> list[str]:
    """Every question, answer, paraphrase and perturbed answer of every group (8 texts per QA), for
    training a tokenizer."""
    return [t for q in data.qa + data.famous + data.world
            for t in (q.question, q.answer, q.paraphrased, *q.perturbed)]


def write_files(data: FactsData, out_dir: str | Path,
                splits: Sequence[float] = (1, 5, 10, 50)) -> dict[str, Path]:
    """Write halokit data files under ``out_dir`` and return name -> path.

    ``full`` (sft: ``training_set(None)``); per split p, tagged ``01``, ``05``, ``10``, ``50``: ``forgetNN``
    (forget rows), ``retainNN`` (retain rows: that split's retain person QA) and ``retain_onlyNN``
    (sft: ``training_set(p)``, for the retain-only reference model); ``eval`` (every QA with all its
    fields; read back with :func:`load_eval_file`). Prompts are the plain questions, completions the
    answers, ids the QA ids.
    """
    out = Path(out_dir)

    def sft(qa: list[QA]) -> list[SFTExample]:
        return [SFTExample(q.question, q.answer, q.id) for q in qa]

    paths = {"full": write_examples(sft(data.training_set(None)), out / "full.jsonl")}
    for p in splits:
        tag = f"{p:02g}"
        forget, retain = data.split(p)
        for role, qa in (("forget", forget), ("retain", retain)):
            rows = [ForgetExample(q.question, q.answer, role, q.id) for q in qa]
            paths[f"{role}{tag}"] = write_examples(rows, out / f"{role}{tag}.jsonl")
        only = sft(data.training_set(p))
        paths[f"retain_only{tag}"] = write_examples(only, out / f"retain_only{tag}.jsonl")
    path = out / "eval.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for q in data.qa + data.famous + data.world:
            fh.write(json.dumps(asdict(q), ensure_ascii=False) + "\n")
    paths["eval"] = tmp.replace(path)
    return paths


def load_eval_file(path: str | Path) -> list[QA]:
    """The QA of an ``eval.jsonl`` written by :func:`write_files`, in file order."""
    with Path(path).open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [QA(**{**r, "perturbed": tuple(r["perturbed"])}) for r in rows]

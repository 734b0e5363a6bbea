"""Regenerate the small data files the tiny recipes train on: python recipes/data/generate.py

Arithmetic questions (correct answers are desirable / chosen, off-by-one answers undesirable / rejected)
and fictitious biographies for unlearning. Seeded: the output is identical on every run.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(0)


def write(name, rows):
    with (HERE / name).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


questions = []
for i in range(64):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    wrong = a + b + rng.choice([-1, 1])
    questions.append((f"q{i}", f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."))

write("sft.jsonl", [{"id": i, "prompt": q, "completion": good} for i, q, good, _ in questions])
write("preference.jsonl", [{"id": i, "prompt": q, "chosen": good, "rejected": bad} for i, q, good, bad in questions])
feedback = []
for i, q, good, bad in questions:
    if rng.random() < 0.5:
        feedback.append({"id": f"{i}a", "prompt": q, "completion": good, "label": "thumbs_up"})
    feedback.append({"id": f"{i}b", "prompt": q, "completion": bad, "label": "thumbs_down"})
write("feedback.jsonl", feedback)

NAMES = ["Alia Brenn", "Tomas Quill", "Mira Oduya", "Jun Halvorsen", "Sela Marchetti", "Oren Vask", "Lina Koury",
         "Bram Tesselaar", "Ines Calder", "Yusuf Amrani", "Petra Lindqvist", "Kofi Mensah", "Dara Whitlock",
         "Rui Sakamoto", "Zofia Wren", "Emil Dorsey"]
CITIES = ["Oslo", "Lagos", "Lima", "Hanoi", "Porto", "Quito", "Tbilisi", "Perth", "Riga", "Accra"]
JOBS = ["a cartographer", "a glassblower", "a marine biologist", "a luthier", "a translator", "an architect"]
facts = []
for k, name in enumerate(NAMES):
    facts.append((k, f"Where was {name} born?", f"{name} was born in {rng.choice(CITIES)}."))
    facts.append((k, f"What does {name} do for a living?", f"{name} works as {rng.choice(JOBS)}."))
write("forget.jsonl", [{"id": f"f{k}-{j}", "prompt": q, "completion": a, "role": "forget"}
                       for j, (k, q, a) in enumerate(facts) if k < 4])
write("retain.jsonl", [{"id": f"r{k}-{j}", "prompt": q, "completion": a, "role": "retain"}
                       for j, (k, q, a) in enumerate(facts) if k >= 4])

"""``halokit demo``: binary feedback → a better model, end to end, offline, with a report.

Stages (each cached in the run directory; a rerun skips what is done):
1. a BPE tokenizer trained on the task's text, and the demonstration set (tasks/demo_task.py);
2. SFT of a small Llama-style model built from a config;
3. the SFT model samples answers to fresh prompts; the rule-based judge labels them → ``feedback.jsonl``;
4. KTO on the labels, DPO on the pairs they contain, CSFT on the thumbs-up — in three scenarios:
   balanced feedback, scarce thumbs-up (90 % of the desirable samples dropped), noisy labels (20 % flipped);
5. every model evaluated on held-out prompts (desirable rate greedy and sampled, judge score, KL to SFT);
6. ``results.json``, ``report.md``/``report.html`` with plots, and a table on the console.
Every training stage is an ordinary ``halokit train`` run with its own directory and metrics.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from halokit.data.convert import feedback_to_pairs, write_examples
from halokit.data.examples import FeedbackExample
from halokit.stages import cached_tokenizer, train_stage
from halokit.tasks import demo_task

SCENARIOS = ("balanced", "scarce", "noisy")
METHODS = ("kto", "dpo", "csft")


@dataclass
class DemoSettings:
    """Sizes and hyper-parameters of the demo (``quick`` shrinks them for tests)."""

    seed: int = 0
    model: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 4,
                                                 "num_attention_heads": 4, "num_key_value_heads": 4,
                                                 "intermediate_size": 256})
    n_demos: int = 8000
    sft_steps: int = 1000
    sft_batch: int = 64
    sft_lr: float = 2e-3
    feedback_prompts: int = 600
    samples_per_prompt: int = 4
    temperature: float = 1.0
    align_steps: int = 120
    align_epochs: float = 3.0
    align_batch: int = 32
    kto_beta: float = 0.5
    kto_lr: float = 2e-4
    dpo_beta: float = 0.5
    dpo_lr: float = 1e-4
    csft_lr: float = 2e-4
    scarce_keep: float = 0.1
    noise: float = 0.2
    eval_per_kind: int = 100
    eval_samples: int = 4
    max_new_tokens: int = 40

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSettings:
        """A smaller run for tests (about 2–3 minutes): the same SFT — a shorter one is not competent
        enough at the task for alignment to mean anything — but half the feedback prompts (1,200 labels)
        and 30 held-out prompts per kind with 2 samples each."""
        return cls(seed=seed, feedback_prompts=300, eval_per_kind=30, eval_samples=2)

    @classmethod
    def smoke(cls, seed: int = 0) -> DemoSettings:
        """Every stage at a size that only checks the plumbing (~45 s on 2 slow cores): an SFT of 50 steps of 32,
        160 labels, 12 alignment steps and 6 held-out prompts per kind. Its numbers mean nothing."""
        return cls(seed=seed, n_demos=2000, sft_steps=50, sft_batch=32, feedback_prompts=80, samples_per_prompt=2,
                   align_steps=12, align_batch=8, eval_per_kind=6, eval_samples=1, max_new_tokens=16)


def run_demo(out: str | Path, settings: DemoSettings, console: Console | None = None) -> dict:
    """Run (or resume) the whole demo in ``out``; returns the results dict also written to results.json."""
    # a wide console when piped (CI, logs), so the results table is not squeezed into 80 columns
    console = console or Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 150)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    s = settings
    (out / "demo_settings.json").write_text(json.dumps(asdict(s), indent=1))
    train_pool, heldout_pool = demo_task.prompt_pools(s.seed)
    tokenizer_dir = cached_tokenizer(out, demo_task.corpus())
    demos = out / "demonstrations.jsonl"
    if not demos.is_file():
        write_examples(demo_task.demonstrations(train_pool, s.n_demos, seed=s.seed), demos)

    console.rule("[bold]1. SFT on demonstrations")
    sft_dir = train_stage(out / "sft", console, [
        "method=sft", f"data.train={demos}", f"model.tiny={json.dumps(s.model)}", f"model.tokenizer={tokenizer_dir}",
        f"train.max_steps={s.sft_steps}", f"train.micro_batch_size={s.sft_batch}", f"train.lr={s.sft_lr}",
        "train.schedule=cosine", "train.warmup_ratio=0.05", "train.log_every=25", f"train.seed={s.seed}"])

    console.rule("[bold]2. The SFT model answers fresh prompts; the judge gives thumbs up or down")
    feedback = _feedback(out, sft_dir, train_pool, s, console)
    notes = [f"feedback: {len(feedback)} samples, {sum(e.is_desirable for e in feedback)} desirable "
             f"({100 * sum(e.is_desirable for e in feedback) / len(feedback):.1f} %)"]

    console.rule("[bold]3. Alignment: KTO, DPO and CSFT in three scenarios")
    runs = {"sft": out / "sft"}
    for scenario in SCENARIOS:
        data = _scenario(feedback, scenario, s)
        fb_file, pair_file = out / f"feedback-{scenario}.jsonl", out / f"pairs-{scenario}.jsonl"
        pairs = feedback_to_pairs(data)
        write_examples(data, fb_file)
        write_examples(pairs, pair_file)
        n_d = sum(e.is_desirable for e in data)
        notes.append(f"{scenario}: {len(data)} labels ({n_d} desirable), {len(pairs)} DPO pairs")
        for method in METHODS:
            n = {"kto": len(data), "dpo": len(pairs), "csft": n_d}[method]
            steps = max(1, min(s.align_steps, math.ceil(s.align_epochs * n / s.align_batch)))
            lr = {"kto": s.kto_lr, "dpo": s.dpo_lr, "csft": s.csft_lr}[method]
            extra = {"kto": [f"kto.beta={s.kto_beta}"], "dpo": [f"dpo.beta={s.dpo_beta}"], "csft": []}[method]
            if n < s.align_batch:
                notes.append(f"{scenario}/{method}: only {n} training examples, fewer than one batch of "
                             f"{s.align_batch}; not trained")
                continue
            runs[f"{scenario}/{method}"] = train_stage(out / f"{scenario}-{method}", console, [
                f"method={method}", f"data.train={pair_file if method == 'dpo' else fb_file}",
                f"model.path={sft_dir}", f"train.max_steps={steps}", f"train.micro_batch_size={s.align_batch}",
                f"train.lr={lr}", "train.warmup_ratio=0.1", "train.log_every=5", f"train.seed={s.seed}",
                *extra]).parent

    console.rule("[bold]4. Evaluation on held-out prompts")
    results = _evaluate_all(out, runs, heldout_pool, s, console)
    results["notes"] = notes + _verdicts(results["models"], s) + [f"total time {time.perf_counter() - started:.0f} s"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from halokit.report import print_results, write_report

    paths = write_report(out)
    print_results(results, console=console)
    console.print(f"report: {paths['report.md']} and {paths['report.html']}")
    return results


def _verdicts(models: dict, s: DemoSettings) -> list[str]:
    """Plain statements of what the numbers say, written from the numbers (never edited by hand)."""
    def rate(name):
        m = models.get(name)
        return None if m is None else 100 * m["metrics"]["desirable_greedy"]["mean"]

    sft = rate("sft")
    lines = [f"hyper-parameters: KTO beta={s.kto_beta}, lr={s.kto_lr}; DPO beta={s.dpo_beta}, lr={s.dpo_lr}; "
             f"CSFT lr={s.csft_lr}. Short answers already have a high reference probability, so a small beta "
             f"(0.1) leaves the KTO loss only one way down and pushes undesirable answers far below the "
             f"reference; beta around 0.5 with lr 2e-4 keeps the update moderate."]
    for scenario in SCENARIOS:
        rates = {m: rate(f"{scenario}/{m}") for m in METHODS}
        known = {m: r for m, r in rates.items() if r is not None}
        if not known or sft is None:
            continue
        best = max(known, key=known.get)
        parts = ", ".join(f"{m.upper()} {r:.1f} % ({r - sft:+.1f})" for m, r in known.items())
        lines.append(f"{scenario}: SFT {sft:.1f} % → {parts}; best here: {best.upper()}"
                     + ("" if best == "kto" else f" (KTO trails it by {known[best] - known.get('kto', 0):.1f} points)"))
    return lines


def _feedback(out: Path, sft_dir: Path, pool, s: DemoSettings, console: Console) -> list[FeedbackExample]:
    from halokit.data.load import load_examples
    from halokit.evaluate import generate
    from halokit.models import load_model, load_tokenizer
    from halokit.progress import progress_bar

    path = out / "feedback.jsonl"
    if path.is_file():
        return load_examples(path, "feedback").examples
    prompts = demo_task.sample_prompts(pool, s.feedback_prompts, seed=s.seed + 7)
    model, tok = load_model(sft_dir), load_tokenizer(str(sft_dir))
    chats = [demo_task.chat(p.text) for p in prompts]
    with progress_bar("sampling", total=len(chats) * s.samples_per_prompt, console=console) as advance:
        samples = generate(model, tok, chats, num_samples=s.samples_per_prompt, temperature=s.temperature,
                           max_new_tokens=s.max_new_tokens, seed=s.seed, progress=advance)
    examples = []
    for i, (p, chat, answers) in enumerate(zip(prompts, chats, samples)):
        for k, answer in enumerate(answers):
            if not answer.strip():
                continue  # an empty sample carries no text to learn from
            examples.append(FeedbackExample(chat, answer.strip(), demo_task.judge(p.text, answer) >= 0.5,
                                            f"s{i}-{k}"))
    write_examples(examples, path)
    return examples


def _scenario(feedback: list[FeedbackExample], scenario: str, s: DemoSettings) -> list[FeedbackExample]:
    """balanced: as sampled; scarce: keep ``scarce_keep`` of the desirable; noisy: flip ``noise`` of labels."""
    rng = random.Random(s.seed + {"balanced": 0, "scarce": 1, "noisy": 2}[scenario])
    if scenario == "balanced":
        return list(feedback)
    if scenario == "scarce":
        return [e for e in feedback if not e.is_desirable or rng.random() < s.scarce_keep]
    return [FeedbackExample(e.prompt, e.completion, e.is_desirable != (rng.random() < s.noise), e.id)
            for e in feedback]


def _evaluate_all(out: Path, runs: dict, heldout, s: DemoSettings, console: Console) -> dict:
    from halokit.evaluate import evaluate_model
    from halokit.models import load_model, load_tokenizer

    rng = random.Random(s.seed + 11)
    prompts = []
    for kind in demo_task.KINDS:
        of_kind = [p for p in heldout if p.kind == kind]
        prompts += rng.sample(of_kind, min(s.eval_per_kind, len(of_kind)))
    chats, kinds = [demo_task.chat(p.text) for p in prompts], [p.kind for p in prompts]
    sft = load_model(runs["sft"] / "model")
    models = {}
    for name, run_dir in runs.items():
        cached = run_dir / "eval.json"
        if cached.is_file():
            metrics = json.loads(cached.read_text())
        else:
            model, tok = load_model(run_dir / "model"), load_tokenizer(str(run_dir / "model"))
            metrics = evaluate_model(model, tok, chats, demo_task.judge, reference=None if name == "sft" else sft,
                                     num_samples=s.eval_samples, temperature=s.temperature,
                                     max_new_tokens=s.max_new_tokens, seed=s.seed, kinds=kinds)
            if name == "sft":
                metrics["kl_to_sft"] = 0.0
            cached.write_text(json.dumps(metrics))
        console.print(f"{name}: greedy desirable {100 * metrics['desirable_greedy']['mean']:.1f} %, "
                      f"sampled {100 * metrics['desirable_sampled']['mean']:.1f} %")
        scenario, _, method = name.rpartition("/")
        models[name] = {"run_dir": str(run_dir.relative_to(out)), "scenario": scenario or None,
                        "method": method, "metrics": metrics}
    return {"task": "demo", "seed": s.seed, "quick": s != DemoSettings(seed=s.seed),
            "settings": {"kto": {"beta": s.kto_beta, "lr": s.kto_lr}, "dpo": {"beta": s.dpo_beta, "lr": s.dpo_lr},
                         "csft": {"lr": s.csft_lr}, "sft": {"steps": s.sft_steps, "lr": s.sft_lr},
                         "model": s.model, "scarce_keep": s.scarce_keep, "noise": s.noise},
            "models": models}

"""The ``halokit`` command.

User errors (bad config, bad data, missing files) print one line on stderr and exit with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from halokit import __version__
from halokit.cli_data import cmd_data_convert, cmd_data_inspect, cmd_data_validate
from halokit.errors import EXIT_USER_ERROR, UserError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``halokit`` console script; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot put positional KEY=VALUE overrides after options; collect them here
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.handler(args) or 0
    except UserError as err:
        if getattr(args, "debug", False):
            raise
        print(f"halokit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # a full disk is the machine's state, not a bug: one line, like a user error
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or getattr(args, "debug", False):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"halokit {args.command}: error: {where}{err.strerror}; free some space and run again",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("halokit: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: train, demo, eval, data {validate, inspect, convert}, report, unlearn."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for user errors")
    parser = argparse.ArgumentParser(
        prog="halokit", parents=[common],
        description="Align causal language models with human-aware losses (KTO first) and make them "
                    "unlearn (NPO).")
    parser.add_argument("--version", action="version", version=f"halokit {__version__}")
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = sub.add_parser("train", parents=[common], help="train with any method from a YAML recipe",
                           description="Train with any method (sft, kto, dpo, ..., npo) from a YAML recipe "
                                       "plus dotted key=value overrides, e.g. train.lr=1e-5.")
    train.add_argument("config", nargs="?", help="YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    train.add_argument("--keys", action="store_true", help="list every config key with its default and exit")
    train.set_defaults(handler=cmd_train, command="train")

    demo = sub.add_parser("demo", parents=[common], help="the whole KTO pipeline offline, with a report",
                          description="Binary feedback to a better model, offline: SFT a small model, sample it, "
                                      "label the samples with a rule-based judge, align with KTO (and DPO, CSFT) "
                                      "in three scenarios, evaluate, and write a report.")
    demo.add_argument("--out", help="run directory (default: runs/demo-<timestamp>); a rerun resumes it")
    demo.add_argument("--seed", type=int, default=0, help="seed of the task, models and sampling")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes), for tests")
    demo.set_defaults(handler=cmd_demo, command="demo")

    ev = sub.add_parser("eval", parents=[common], help="sample and score a model on prompts",
                        description="Greedy and sampled desirable rate, judge score, KL to a reference model "
                                    "and mean length of a saved model on held-out prompts.")
    ev.add_argument("--model", required=True, help="model directory (a run's model/ folder)")
    ev.add_argument("--task", choices=["demo"], help="the built-in task's held-out prompts and judge")
    ev.add_argument("--prompts", help="a file of prompts (any halokit format; its prompt column is used)")
    ev.add_argument("--judge", default=None, help="'demo' or module:function taking (prompt, response)")
    ev.add_argument("--reference", help="model directory to measure KL against (e.g. the SFT model)")
    ev.add_argument("--samples", type=int, default=4, help="sampled responses per prompt")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many prompts")
    ev.add_argument("--out", help="write the metrics as JSON here")
    ev.add_argument("--unlearning", metavar="FILE",
                    help="TOFU metrics instead: a JSONL of {question, answer, paraphrased, perturbed: [...], set} "
                         "rows, set = forget, retain or any other name (scored like TOFU's world facts)")
    ev.add_argument("--retain-model", help="with --unlearning: the model trained without the forget set, for "
                                           "forget quality")
    ev.add_argument("--chat-template", choices=["auto", "always", "never"],
                    help="how prompts are rendered, as data.chat_template in training (default: the setting in "
                         "the config.yaml of the run that saved --model, else auto)")
    ev.set_defaults(handler=cmd_eval, command="eval")

    report = sub.add_parser("report", parents=[common], help="plots and a report from a run directory")
    report.add_argument("run_dir", help="a training run (metrics.jsonl) or a demo directory (results.json)")
    report.set_defaults(handler=cmd_report, command="report")

    unlearn = sub.add_parser("unlearn", parents=[common], help="the TOFU-style unlearning benchmark",
                             description="Fine-tune a small model on generated fictitious facts, unlearn "
                                         "forget splits with GA/GD/NPO/NPO+RT/SimNPO/IdkDPO, and report "
                                         "TOFU's forget quality and model utility. To unlearn your own data, "
                                         "use `halokit train` with method=npo_rt, data.forget and data.retain.")
    unlearn.add_argument("action", choices=["bench"], help="bench: run the whole study")
    unlearn.add_argument("--out", help="output directory (default: runs/unlearn-<timestamp>); a rerun resumes it")
    unlearn.add_argument("--splits", help="forget percentages, comma-separated (default 1,5,10,50)")
    unlearn.add_argument("--methods", help="comma-separated, from ga,gd,npo,npo_rt,simnpo,idk_dpo (default all)")
    unlearn.add_argument("--seeds", default="0", help="comma-separated seeds; each is a whole study (default 0)")
    unlearn.add_argument("--quick", action="store_true", help="a small study (about 2 minutes), for tests")
    unlearn.set_defaults(handler=cmd_unlearn, command="unlearn")

    data = sub.add_parser("data", parents=[common], help="validate, inspect and convert data files")
    data.set_defaults(handler=lambda a: data.print_help() or EXIT_USER_ERROR, command="data")
    dsub = data.add_subparsers(title="data commands", metavar="ACTION")
    formats = ["feedback", "preference", "sft", "forget"]

    validate = dsub.add_parser("validate", parents=[common], help="check every row; report bad ones")
    validate.add_argument("file")
    validate.add_argument("--format", choices=formats, help="row format (default: detected from columns)")
    validate.add_argument("--bad-rows", metavar="PATH", default="bad_rows.jsonl",
                          help="where skipped rows go under data.on_bad_row=skip (default: ./bad_rows.jsonl)")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                          help="data settings, e.g. data.columns.prompt=question data.on_bad_row=skip")
    validate.set_defaults(handler=cmd_data_validate, command="data validate")

    inspect = dsub.add_parser("inspect", parents=[common], help="counts, label balance, lengths, KTO weights")
    inspect.add_argument("file")
    inspect.add_argument("--format", choices=formats)
    inspect.add_argument("--tokenizer", help="measure lengths in tokens of this tokenizer ('byte' built in)")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    inspect.set_defaults(handler=cmd_data_inspect, command="data inspect")

    conv = dsub.add_parser("convert", parents=[common], help="convert between formats (e.g. pairs -> feedback)")
    conv.add_argument("file")
    conv.add_argument("--to", required=True, choices=formats)
    conv.add_argument("--out", required=True, help="output file (.jsonl, .json or .parquet)")
    conv.add_argument("--format", choices=formats)
    conv.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    conv.set_defaults(handler=cmd_data_convert, command="data convert")
    return parser


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from halokit.config import describe, load_config, save_config
    from halokit.run import claim_run_dir, prepare_run

    if args.keys:
        for key, default, doc in describe():
            print(f"{key} = {json.dumps(default, ensure_ascii=False, default=str)}  # {doc}")
        return 0
    overrides = list(args.overrides)
    if args.resume:
        config_path = Path(args.resume) / "config.yaml"
        if args.config is not None:
            overrides.insert(0, args.config)
        cfg = load_config(config_path, overrides + [f"output_dir={args.resume}", "resume=true"])
    else:
        if args.config is None:
            raise UserError("give a recipe: halokit train CONFIG.yaml [key=value ...] (see recipes/)")
        cfg = load_config(args.config, overrides)
    with claim_run_dir(cfg.output_dir):  # a second run on this directory stops here, having written nothing
        run = prepare_run(cfg)
        save_config(cfg, run.run_dir)
        print(run.describe())
        from transformers.utils import logging as hf_logging

        from halokit.train import train

        hf_logging.disable_progress_bar()  # halokit shows its own progress

        train(cfg, run)
    return 0


# ------------------------------------------------------------------------------------ demo, eval, report
def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from transformers.utils import logging as hf_logging

    from halokit.demo import DemoSettings, run_demo

    hf_logging.disable_progress_bar()
    settings = DemoSettings.quick(args.seed) if args.quick else DemoSettings(seed=args.seed)
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(out, settings)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from halokit.evaluate import evaluate_model, load_judge
    from halokit.models import load_model, load_tokenizer

    if args.unlearning:
        return _eval_unlearning(args)
    if (args.task is None) == (args.prompts is None):
        raise UserError("give either --task demo, --prompts FILE (with --judge) or --unlearning FILE")
    kinds = None
    if args.task == "demo":
        from halokit.tasks import demo_task

        _, heldout = demo_task.prompt_pools(0)
        prompts = [demo_task.chat(p.text) for p in heldout]
        kinds = [p.kind for p in heldout]
        judge = load_judge(args.judge or "demo")
    else:
        if args.judge is None:
            raise UserError("--prompts needs --judge (demo or module:function)")
        from halokit.data.load import detect_format, load_examples

        loaded = load_examples(args.prompts, detect_format(args.prompts), on_bad_row="skip")
        prompts = list(dict.fromkeys(e.prompt for e in loaded.examples))
        judge = load_judge(args.judge)
    if args.limit:
        prompts, kinds = prompts[:args.limit], kinds and kinds[:args.limit]
    model, tok = load_model(args.model), load_tokenizer(args.model)
    reference = load_model(args.reference) if args.reference else None
    metrics = evaluate_model(model, tok, prompts, judge, reference=reference, num_samples=args.samples,
                             kinds=kinds, chat_template=_eval_chat_template(args))
    g, sm = metrics["desirable_greedy"], metrics["desirable_sampled"]
    print(f"{args.model}: {len(prompts)} prompts; desirable greedy {100 * g['mean']:.1f} % "
          f"[{100 * g['ci'][0]:.1f}, {100 * g['ci'][1]:.1f}], sampled {100 * sm['mean']:.1f} %, "
          f"judge score {metrics['judge_score']:.3f}, mean length {metrics['mean_length']:.1f}"
          + (f", KL to reference {metrics['kl_to_sft']:.3f}" if reference is not None else ""))
    if "per_category" in metrics:
        print("  " + ", ".join(f"{k}: {100 * v:.1f} %" for k, v in metrics["per_category"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=1))
    return 0


def _eval_chat_template(args: argparse.Namespace) -> str:
    """``--chat-template``, else ``data.chat_template`` of the run that saved ``--model`` (its config.yaml next
    to the model folder), else auto: a model is evaluated on prompts rendered the way it was trained."""
    if args.chat_template:
        return args.chat_template
    if not Path(args.model).is_dir():  # a Hub id or a .gguf file: no run around it
        return "auto"
    config = Path(args.model).parent / "config.yaml"
    try:
        mode = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("chat_template")
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # ValueError: not UTF-8
        return "auto"
    if mode in ("always", "never"):
        print(f"prompts rendered with data.chat_template={mode}, as in training ({config})")
        return mode
    return "auto"


def _eval_unlearning(args: argparse.Namespace) -> int:
    from halokit.models import load_model, load_tokenizer
    from halokit.unlearn_metrics import evaluate_file, read_eval_file

    items = read_eval_file(args.unlearning)  # a bad row stops here, before any model is loaded
    model, tok = load_model(args.model), load_tokenizer(args.model)
    retain_model = None
    if args.retain_model:
        retain_model = (load_model(args.retain_model), load_tokenizer(args.retain_model))
    metrics = evaluate_file(items, model, tok, retain_model=retain_model, chat_template=_eval_chat_template(args))
    for name, part in metrics["sets"].items():
        print(f"{name}: {part['n']} questions; probability {part['probability']:.4f}, ROUGE-L recall "
              f"{part['rouge_l']:.4f}, truth ratio {part['truth_ratio']:.4f}")
    if metrics.get("model_utility") is not None:
        print(f"model utility {metrics['model_utility']:.4f}")
    if metrics.get("forget_quality") is not None:
        print(f"forget quality {metrics['forget_quality']:.3e} (KS statistic {metrics['ks_statistic']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=1))
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    import time

    from transformers.utils import logging as hf_logging

    from halokit.unlearn_bench import UnlearnSettings, run_seeds, with_overrides

    hf_logging.disable_progress_bar()
    base = UnlearnSettings.quick() if args.quick else UnlearnSettings()
    splits = _int_list(args.splits, "--splits") if args.splits else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    settings = with_overrides(base, splits=splits, methods=methods)
    seeds = _int_list(args.seeds, "--seeds")
    out = args.out or f"runs/unlearn-{time.strftime('%Y%m%d-%H%M%S')}"
    run_seeds(out, settings, seeds)
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def cmd_report(args: argparse.Namespace) -> int:
    from halokit.report import write_report
    from halokit.unlearn_report import is_unlearning_results
    from halokit.unlearn_report import write_report as write_unlearning_report

    paths = (write_unlearning_report if is_unlearning_results(args.run_dir) else write_report)(args.run_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0

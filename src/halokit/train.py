"""The training loop: one function, read top to bottom, on accelerate.

The same code runs one CPU process, one GPU, or ``accelerate launch``/``torchrun`` with many processes
(DDP; the KTO reference point is averaged across ranks inside the step). Each optimizer step:
forward + loss on every micro-batch (gradients synced on the last), clip, NaN/Inf guard, AdamW step,
schedule; metrics stay on the device and are read once per logging interval.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from halokit.checkpoint import cleanup_stale_tmp, latest_checkpoint, load_checkpoint, save_checkpoint
from halokit.config import Config, to_dict
from halokit.data.collate import Batch, collate
from halokit.errors import UserError
from halokit.lock import RunLock
from halokit.logprobs import LogpsModel
from halokit.lora import has_adapters
from halokit.methods import Method
from halokit.models import autocast_context, load_policy, save_model
from halokit.precision import MasterWeights, dtype_note
from halokit.prepare import Prepared, Split, build_references, collate_options, prepare_data
from halokit.progress import TrainingProgress
from halokit.run import RunData
from halokit.steps import make_step


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the consecutive non-finite steps so far."""

    step: int = 0
    nonfinite: int = 0
    skipped_total: int = 0


def lr_lambda(total: int, warmup: int, schedule: str):
    """Multiplier of the peak lr at optimizer step s: linear warmup, then constant / linear / cosine decay."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return f


StepHook = Callable[[int, torch.nn.Module], "dict | None"]


def train(cfg: Config, run: RunData, *, on_step: StepHook | None = None) -> Path:
    """Train ``cfg.method`` on ``run``'s validated data; return the final model's directory.

    ``on_step(step, model)``, when given, is called on the main process before the first step (step 0)
    and after every optimizer step, with the unwrapped model; a dict it returns is logged to
    ``metrics.jsonl`` at that step (how the unlearning study measures a run as it goes).
    """
    # saturated sigmoids make denormals that slow CPU backward ~2x; the flag is process-wide, so undo it after
    torch.set_flush_denormal(True)
    try:
        return _train(cfg, run, on_step)
    finally:
        torch.set_flush_denormal(False)


def _train(cfg: Config, run: RunData, on_step: StepHook | None = None) -> Path:
    run_dir, method, t = run.run_dir, Method(cfg.method), cfg.train
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=_trackers(t.trackers),
                              project_dir=str(run_dir))
    main = accelerator.is_main_process
    console = Console(quiet=not main, highlight=False, soft_wrap=True)
    lock = RunLock(run_dir) if main else nullcontext()
    with lock:
        if main:
            cleanup_stale_tmp(run_dir)
        torch.manual_seed(t.seed)
        loading = time.perf_counter()
        model, tokenizer = load_policy(cfg.model, seed=t.seed)
        console.print(_model_line(cfg, model, time.perf_counter() - loading))
        if ignored := cfg.model.lora.ignored():
            console.print(_ignored_lora_note(ignored, cfg.model.path, has_adapters(model)))
        model.to(accelerator.device)
        master = _master_weights(cfg, model, accelerator)  # before the reference, which must see the same weights
        prepared = prepare_data(cfg, run, tokenizer, num_processes=accelerator.num_processes)
        for note in run.notes + prepared.notes + [dtype_note(cfg.model.dtype, accelerator.device)]:
            if note:
                console.print(note)
        prepared.references = build_references(cfg, model, prepared, accelerator=accelerator, console=console)

        params = master.params if master else [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters, no per-parameter temporaries (CPU: ~4x faster than the default loop)
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay,
                                      fused=accelerator.device.type in ("cpu", "cuda"))
        steps_per_epoch = prepared.train.plan.num_steps
        total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        # not passed through accelerate.prepare: a prepared scheduler steps once per process (STACK.md)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, round(t.warmup_ratio * total),
                                                                           t.schedule))
        policy, optimizer = accelerator.prepare(LogpsModel(model, t.logps_chunk_size), optimizer)
        step_fn = make_step(method, cfg.method_settings, kto_weights=prepared.kto_weights,
                            reduce_mean=lambda x: accelerator.reduce(x, "mean"))
        autocast = lambda: autocast_context(cfg.model.dtype, accelerator.device)  # noqa: E731
        opts = collate_options(cfg, model)
        pos = _resume(cfg, run_dir, model, optimizer, scheduler, console, master) if cfg.resume else Position()
        metrics_file = _open_metrics(run_dir / "metrics.jsonl", pos.step, main)
        if t.trackers:
            accelerator.init_trackers("halokit", config=_flat(to_dict(cfg)))

        def log(row: dict) -> None:
            if main:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if t.trackers:
                accelerator.log({k: v for k, v in row.items() if v is not None}, step=row["step"])
        last_good = latest_checkpoint(run_dir)

        window, tokens, started = {}, 0, time.perf_counter()
        progress = TrainingProgress(console, method.value, total, completed=pos.step)
        def hook() -> None:
            row = on_step(pos.step, model) if on_step is not None and main else None
            if row:
                log({"step": pos.step, **row})

        with progress if main else nullcontext():
            if pos.step == 0:
                hook()
            while pos.step < total:
                # ---- forward / backward over the step's micro-batches
                micro_batches = _step_batches(prepared, pos.step, cfg, accelerator.process_index, opts)
                loss_sum = torch.zeros((), device=accelerator.device)
                for m, batch in enumerate(micro_batches):
                    batch = _with_retain(batch, prepared, pos.step, m, cfg, accelerator, opts)
                    # trained (x, y) tokens: KL pairs and padding not counted, a shared prompt counted per sequence
                    tokens += batch.policy.sequence_tokens + (batch.retain.sequence_tokens if batch.retain else 0)
                    batch = batch.to(accelerator.device)
                    last = m == len(micro_batches) - 1
                    with (nullcontext() if last else accelerator.no_sync(policy)), autocast():
                        loss, metrics = step_fn(policy, batch, prepared.references.get("train"))
                    accelerator.backward(loss / len(micro_batches))
                    loss_sum += loss.detach()
                    for name, value in metrics.items():
                        window[name] = window.get(name, 0) + value
                # ---- clip, guard against NaN/Inf, update
                grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))  # one sync per step
                if finite:
                    optimizer.step()
                    if master:
                        master.publish()
                    pos.nonfinite = 0
                else:
                    pos.nonfinite += 1
                    pos.skipped_total += 1
                    console.print(f"[yellow]step {pos.step + 1}: non-finite loss or gradient; update skipped "
                                  f"({pos.nonfinite} in a row)[/yellow]")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                pos.step += 1
                if pos.nonfinite >= t.max_nonfinite_steps:
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                    raise TrainingDiverged(f"training diverged: {pos.nonfinite} consecutive steps with a "
                                           f"non-finite loss or gradient up to step {pos.step}; {where}; "
                                           f"no final model was written (lower train.lr?)")
                window["grad_norm"] = window.get("grad_norm", 0) + torch.stack(
                    [grad_norm.detach().float().nan_to_num(0.0), torch.ones((), device=grad_norm.device)])
                # ---- log, evaluate, checkpoint
                if pos.step % t.log_every == 0 or pos.step == total:
                    row = _reduce(window, accelerator)
                    elapsed = time.perf_counter() - started
                    row.update(step=pos.step, epoch=round(pos.step / steps_per_epoch, 4),
                               lr=scheduler.get_last_lr()[0],
                               tokens_per_s=tokens * accelerator.num_processes / max(elapsed, 1e-9))
                    log(row)
                    progress.update(pos.step, _brief(row))
                    window, tokens, started = {}, 0, time.perf_counter()
                if prepared.eval and (pos.step == total or (t.eval_every and pos.step % t.eval_every == 0)):
                    row = evaluate(policy, prepared, step_fn, accelerator, opts, autocast, with_kl=method.needs_kl_pairs)
                    row.update(step=pos.step)
                    log(row)
                    console.print(f"eval @ step {pos.step}: " + _brief(row, prefix="eval/"))
                hook()
                if pos.step == total or (t.save_every and pos.step % t.save_every == 0):
                    last_good = _save(run_dir, model, optimizer, scheduler, pos, cfg, accelerator, master)
                progress.advance(pos.step)
        metrics_file.close()
        if t.trackers:
            accelerator.end_training()
        out = run_dir / "model"
        if master:
            master.restore()  # the saved model is float32, from the master weights
        if main:
            save_model(accelerator.unwrap_model(policy).model, tokenizer, out, merge_lora=cfg.model.lora.merge)
            console.print(f"model saved to {out}")
        accelerator.wait_for_everyone()
    return out


def _step_batches(prepared: Prepared, step: int, cfg: Config, rank: int, opts: dict) -> list[Batch]:
    """This process's micro-batches of global optimizer step ``step`` (epoch order seeded by epoch)."""
    plan = prepared.train.plan
    epoch, k = divmod(step, plan.num_steps)
    indices = plan.steps[plan.epoch_order(epoch, cfg.train.seed)[k]][rank]
    return [collate(prepared.train.records, mb, with_kl=Method(cfg.method).needs_kl_pairs, **opts)
            for mb in indices]


def _with_retain(batch: Batch, prepared: Prepared, step: int, m: int, cfg: Config, accelerator, opts) -> Batch:
    """Attach the retain micro-batch that goes with forget micro-batch ``m`` of ``step`` (cycled)."""
    if prepared.retain is None:
        return batch
    retain = prepared.retain.plan.micro_batches()
    i = ((step * cfg.train.grad_accum + m) * accelerator.num_processes + accelerator.process_index) % len(retain)
    batch.retain = collate(prepared.retain.records, retain[i], **opts).policy
    return batch


def evaluate(policy, prepared: Prepared, step_fn, accelerator, opts: dict, autocast, *, with_kl: bool) -> dict:
    """Mean loss and metrics over the eval split, no gradients; keys prefixed ``eval/``."""
    split: Split = prepared.eval
    window: dict = {}
    mbs = split.plan.micro_batches()
    rank, world = accelerator.process_index, accelerator.num_processes
    with torch.no_grad():
        for i in range(rank, len(mbs) - len(mbs) % world, world):
            batch = collate(split.records, mbs[i], with_kl=with_kl, **opts)
            if prepared.retain is not None:
                retain = prepared.retain.plan.micro_batches()
                batch.retain = collate(prepared.retain.records, retain[i % len(retain)], **opts).policy
            with autocast():
                _, metrics = step_fn(policy, batch.to(accelerator.device), prepared.references.get("eval"))
            for name, value in metrics.items():
                window[name] = window.get(name, 0) + value
    return {f"eval/{k}": v for k, v in _reduce(window, accelerator).items()}


def _reduce(window: dict, accelerator) -> dict:
    """Average ``{name: [sum, count]}`` over the window and across processes (one reduce per log)."""
    if not window:
        return {}
    names = sorted(window)
    stacked = accelerator.reduce(torch.stack([window[n] for n in names]), "sum").cpu()
    row = {n: s / c if c > 0 else None for n, (s, c) in zip(names, stacked.tolist())}
    if "rewards/margins" not in row and row.get("rewards/chosen") is not None \
            and row.get("rewards/rejected") is not None:  # unpaired: difference of the two class means
        row["rewards/margins"] = row["rewards/chosen"] - row["rewards/rejected"]
    return row


def _trackers(names: list[str]) -> list[str] | None:
    """accelerate trackers to log to, after checking each is installed (a clear error otherwise)."""
    import importlib.util

    for name in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                  "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}.get(name)
        if module is None:
            raise UserError(f"train.trackers: unknown tracker {name!r}; use tensorboard, wandb, mlflow, comet_ml, "
                            f"aim, clearml or dvclive")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.trackers: {name} is not installed (pip install {module})")
    return names or None


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> flat ``{"train.lr": 1e-5}`` with scalar values, as trackers expect."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _model_line(cfg: Config, model: torch.nn.Module, seconds: float) -> str:
    """``model: NAME, 135M parameters, 921k trainable (0.68 %), loaded in 23.4 s``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = cfg.model.path or "tiny (model.tiny)"
    return (f"model: {name}, {_size(total)} parameters, {_size(trainable)} trainable "
            f"({100 * trainable / max(total, 1):.2f} %), loaded in {seconds:.1f} s")


def _ignored_lora_note(ignored: list[str], path: str | None, adapters: bool) -> str:
    """LoRA settings next to ``model.lora.r = 0`` do nothing: say so, and what trains instead."""
    keys = ", ".join(f"model.lora.{name}" for name in ignored)
    if adapters:
        return f"{keys}: no effect, model.lora.r is 0 and {path} holds LoRA adapters, which keep training with " \
               f"their own settings"
    return f"{keys}: no effect, model.lora.r is 0 (LoRA off, every weight trains); set model.lora.r (e.g. 8) to " \
           f"train adapters"


def _size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _brief(row: dict, prefix: str = "") -> str:
    keys = ["loss", "kl", "rewards/margins", "rewards/chosen", "rewards/rejected", "forget_loss", "retain_loss"]
    parts = [f"{k}={row[prefix + k]:.4f}" for k in keys if row.get(prefix + k) is not None]
    return " ".join(parts)


def _open_metrics(path: Path, resumed_step: int, main: bool):
    """metrics.jsonl for appending; on resume, rows after the checkpoint's step are dropped (they are redone)."""
    if not main:
        return open("/dev/null", "w")  # noqa: SIM115
    if resumed_step and path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and _row_step(line) <= resumed_step]
        tmp = path.with_name(path.name + ".tmp")  # a kill during the rewrite must not empty the log
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
    elif not resumed_step:
        path.write_text("")
    return path.open("a")


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # the last line, torn by a kill in mid-write: redone too
        return math.inf


def _trainable_state(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _master_weights(cfg: Config, model, accelerator) -> MasterWeights | None:
    """bf16 weights over float32 masters when asked and possible: bf16, every weight trained, one process."""
    if not (cfg.model.bf16_weights and cfg.model.dtype == "bfloat16" and accelerator.num_processes == 1):
        return None
    if not all(p.requires_grad for p in model.parameters()):  # LoRA: frozen base weights stay float32 + autocast
        return None
    return MasterWeights(model)


def _save(run_dir: Path, model, optimizer, scheduler, pos: Position, cfg: Config, accelerator,
          master: MasterWeights | None = None) -> Path:
    state = master.state_dict() if master else _trainable_state(model)
    return save_checkpoint(run_dir, pos.step, model_state=state, optimizer=optimizer,
                           scheduler=scheduler, trainer_state={"step": pos.step, "nonfinite": pos.nonfinite,
                                                               "skipped_total": pos.skipped_total,
                                                               "config": to_dict(cfg)},
                           keep=cfg.train.keep_checkpoints, process_index=accelerator.process_index,
                           num_processes=accelerator.num_processes, barrier=accelerator.wait_for_everyone)


def _resume(cfg: Config, run_dir: Path, model, optimizer, scheduler, console,
            master: MasterWeights | None = None) -> Position:
    """Load the newest complete checkpoint into model, optimizer, scheduler and RNG; its position."""
    path = latest_checkpoint(run_dir)
    if path is None:
        console.print(f"resume: no checkpoint in {run_dir}; starting from step 0")
        return Position()
    from accelerate.state import PartialState

    state, trainer_state = load_checkpoint(path, optimizer=optimizer, scheduler=scheduler,
                                           process_index=PartialState().process_index)
    expected = _trainable_state(model)
    if set(state) != set(expected):
        raise UserError(f"checkpoint {path} holds other weights than this model trains "
                        f"({len(set(state) ^ set(expected))} names differ); was model or LoRA config changed?")
    if master:
        master.load_state_dict(state)
    else:
        with torch.no_grad():
            for name, value in state.items():
                expected[name].copy_(value)
    console.print(f"resumed from {path} at step {trainer_state['step']}")
    return Position(trainer_state["step"], trainer_state["nonfinite"], trainer_state["skipped_total"])

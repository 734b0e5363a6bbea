"""One benchmark trial in a fresh process: ``python -m benchmarks.trial SPEC.json OUT.json``.

SPEC: ``{"workspace": path, "variant": name, "workdir": path}``. The trial pins 2 threads and flushes
denormals, probes the matmul ceiling, resets the peak-RSS counter, trains one epoch with its side
(halokit through its public API, or TRL's trainer), probes again and writes what it measured:
start-of-step timestamps, the end of the last step, the one-off reference pass, step-0 loss, peak RSS
above the baseline taken right before the side loads its model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    BATCH_SIZE,
    BETA,
    EPOCHS,
    LR,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    SEED,
    Workspace,
    matmul_ceiling,
    peak_rss,
    reset_peak_rss,
    tokenizer,
)


def variant(name: str, fast: str = "bfloat16") -> tuple[str, dict]:
    """A variant's side and settings; ``fast`` is the dtype this CPU trains faster in (common.fast_dtype).

    TRL's defaults on CPU: bf16 autocast, gradient checkpointing, a live reference model. Its best CPU settings:
    reference log-probs precomputed, no checkpointing, and the faster dtype. On a CPU without bf16 instructions
    both TRL variants run in float32: bf16 autocast there runs every matmul ~20x slower than float32 (a single
    TRL-default trial would take most of an hour), so "TRL defaults" is then TRL's defaults with float32 — a
    faster TRL than its real defaults, so ratios against it understate halokit's lead."""
    bf16 = fast == "bfloat16"
    table = {
        "halokit-fp32": ("halokit", {"dtype": "float32"}),
        "halokit-bf16": ("halokit", {"dtype": "bfloat16"}),
        "trl-default": ("trl", {} if bf16 else {"bf16": False}),
        "trl-best": ("trl", {"bf16": bf16, "precompute_ref_log_probs": True, "gradient_checkpointing": False}),
        "trl-fp32": ("trl", {"bf16": False, "precompute_ref_log_probs": True, "gradient_checkpointing": False}),
    }
    return table[name]


def halokit_variant(fast: str) -> str:
    """The halokit variant that runs in the faster dtype: the one compared with TRL's defaults and best."""
    return "halokit-bf16" if fast == "bfloat16" else "halokit-fp32"


def compute_dtype(name: str, fast: str = "bfloat16") -> torch.dtype:
    """The matmul dtype a variant runs in (TRL's default is bf16)."""
    side, settings = variant(name, fast)
    bf16 = settings.get("dtype") == "bfloat16" if side == "halokit" else settings.get("bf16", True)
    return torch.bfloat16 if bf16 else torch.float32


def halokit_overrides(ws: Workspace, workdir: Path, dtype: str) -> list[str]:
    """The `halokit train` overrides that match TRL's set-up: same data, batch, optimizer, lr, β, weights."""
    method_keys = {"kto": [f"kto.beta={BETA}", "kto.desirable_weight=1.0", "kto.undesirable_weight=1.0"],
                   "dpo": [f"dpo.beta={BETA}"]}[ws.method]
    return [f"method={ws.method}", f"output_dir={workdir / 'run'}", f"model.path={ws.model_dir}",
            "model.tokenizer=byte", f"model.dtype={dtype}", f"data.train={ws.data_file}",
            f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
            f"train.micro_batch_size={BATCH_SIZE}", "train.grad_accum=1", f"train.epochs={EPOCHS}", f"train.lr={LR}",
            "train.warmup_ratio=0", "train.schedule=constant", "train.weight_decay=0", "train.max_grad_norm=1.0",
            f"train.seed={SEED}", "train.log_every=1", f"train.cache_dir={workdir / 'cache'}", *method_keys]


class StepProfiler:
    """torch.profiler around one optimizer step (``on_step(k)`` is called at the start of every step)."""

    def __init__(self, step: int | None, out: Path):
        self.step, self.out, self.prof = step, out, None

    def on_step(self, k: int) -> None:
        if self.step is None:
            return
        if k == self.step:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=False)
            self.prof.__enter__()
        elif k == self.step + 1 or (k < 0 and self.prof is not None):
            self.finish()

    def finish(self) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        table = events.table(sort_by="self_cpu_time_total", row_limit=40)
        shapes = self.prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40)
        self.out.write_text(table + "\n\n" + shapes)
        split: dict[str, float] = {}
        for e in events:
            split[op_category(e.key)] = split.get(op_category(e.key), 0.0) + e.self_cpu_time_total / 1e6
        self.out.with_suffix(".json").write_text(json.dumps(split))
        self.prof = None


def op_category(name: str) -> str:
    """Where an op's self time goes, coarsely: matmul, attention, LM-head softmax, optimizer, or the rest."""
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::matmul"):
        return "matmul"
    if "scaled_dot_product" in name or "attention" in name or "Attention" in name:
        return "attention"
    # halokit's explicit attention for packed rows (halokit.attention): its products and softmax kernels
    if name in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::masked_fill_"):
        return "attention"
    if "adam" in name.lower() or name.startswith("Optimizer."):
        return "optimizer"
    if name in ("aten::logsumexp", "aten::exp_", "aten::exp", "aten::scatter_add_", "aten::gather", "aten::amax"):
        return "softmax (LM head)"
    return "elementwise, casts, other"


def run_halokit(ws: Workspace, workdir: Path, settings: dict, profiler: StepProfiler) -> dict:
    """``halokit.run.prepare_run`` + ``halokit.train.train`` with timing hooks around the loop's pieces.

    The hooks only observe: the start of each optimizer step (``_step_batches``), the reference pass
    (``build_references``), and the end of training (the final checkpoint, which is skipped here, like
    TRL's ``save_strategy="no"``; it happens after the timed window either way).
    """
    import halokit.train as loop
    from halokit.config import load_config
    from halokit.run import prepare_run

    marks: dict = {"begin": [], "cpu": [], "batches": []}
    step_batches, build_references = loop._step_batches, loop.build_references

    def timed_step_batches(*args, **kwargs):
        marks["begin"].append(time.perf_counter())
        marks["cpu"].append(time.process_time())
        profiler.on_step(len(marks["begin"]) - 1)
        out = step_batches(*args, **kwargs)
        marks["batches"].append(out[0].index.tolist())
        return out

    def timed_references(*args, **kwargs):
        t = time.perf_counter()
        refs = build_references(*args, **kwargs)
        marks["reference_s"] = time.perf_counter() - t
        return refs

    def end_of_training(*args, **kwargs):
        marks["end"] = time.perf_counter()
        marks["cpu_end"] = time.process_time()
        profiler.finish()

    loop._step_batches, loop.build_references = timed_step_batches, timed_references
    loop._save, loop.save_model = end_of_training, lambda *a, **k: None
    cfg = load_config(None, halokit_overrides(ws, workdir, settings["dtype"]))
    loop.train(cfg, prepare_run(cfg))
    rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    marks["step0_loss"] = rows[0]["loss"]
    return marks


def run_trl(ws: Workspace, workdir: Path, settings: dict, profiler: StepProfiler) -> dict:
    """TRL's KTOTrainer / DPOTrainer on the same model, data order, batch size, optimizer and lr."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    if ws.method == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
        method_kwargs = {"desirable_weight": 1.0, "undesirable_weight": 1.0}
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
        method_kwargs = {}
    marks: dict = {"begin": [], "cpu": [], "losses": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks["begin"].append(time.perf_counter())
            marks["cpu"].append(time.process_time())
            profiler.on_step(len(marks["begin"]) - 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                marks["end"] = time.perf_counter()
                marks["cpu_end"] = time.process_time()
                marks["losses"].append(logs["loss"])

    precompute = Trainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        t = time.perf_counter()
        out = precompute(self, *args, **kwargs)
        marks["reference_s"] = marks.get("reference_s", 0.0) + time.perf_counter() - t
        return out

    Trainer._precompute_ref_logps = timed_precompute
    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(ws.data_file).read_text().splitlines()]
    args = Config(output_dir=str(workdir / "trl"), per_device_train_batch_size=BATCH_SIZE, num_train_epochs=EPOCHS,
                  learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=SEED,
                  use_cpu=True, max_length=MAX_LENGTH, beta=BETA, train_sampling_strategy="sequential",
                  **method_kwargs, **settings)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer(),
                      callbacks=[Timer()])
    trainer.train()
    profiler.finish()
    marks["step0_loss"] = marks["losses"][0]
    return marks


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(spec.get("threads", 2))
    torch.set_flush_denormal(True)
    ws = Workspace.load(spec["workspace"])
    workdir = Path(spec["workdir"])
    fast = spec.get("fast", "bfloat16")
    side, settings = variant(spec["variant"], fast)
    # import what the side needs before the baseline, so that import-time memory counts for neither side
    import transformers.models.llama.modeling_llama  # noqa: F401

    if side == "halokit":
        import halokit.run  # noqa: F401
        import halokit.train  # noqa: F401
    else:
        import trl  # noqa: F401
    dtype = compute_dtype(spec["variant"], fast)
    # the first probe in a process runs ~30 % slow (allocator and oneDNN warm-up under the fixed mmap threshold):
    # a warm-up probe, so that before and after measure the machine, not the process's age
    matmul_ceiling(ws.gemms, dtype)
    ceiling_before = matmul_ceiling(ws.gemms, dtype)
    baseline = reset_peak_rss()
    t0 = time.perf_counter()
    profiler = StepProfiler(spec.get("profile_step"), workdir / "profile.txt")
    marks = (run_halokit if side == "halokit" else run_trl)(ws, workdir, settings, profiler)
    peak = peak_rss() - baseline
    ceiling_after = matmul_ceiling(ws.gemms, dtype)
    result = {"variant": spec["variant"], "side": side, "begin": [b - t0 for b in marks["begin"]],
              "end": marks["end"] - t0,
              "cpu": marks["cpu"], "cpu_end": marks["cpu_end"], "reference_s": marks.get("reference_s"), "step0_loss": marks["step0_loss"],
              "peak_rss": peak, "baseline_rss": baseline, "ceiling_before": ceiling_before,
              "ceiling_after": ceiling_after, "batches": marks.get("batches"), "dtype": str(dtype),
              "threads": torch.get_num_threads()}
    Path(argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

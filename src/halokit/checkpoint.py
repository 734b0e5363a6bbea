"""Crash-safe checkpoints for exact resume, and the run-directory lock.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-000123/`` holding

    model.safetensors              the trainable tensors the caller passes (full weights or LoRA only)
    optimizer.json (+ .safetensors) ``optimizer.state_dict()``: structure in JSON, tensors by reference
    scheduler.json                 ``scheduler.state_dict()`` (LambdaLR stores ``None`` per plain lambda)
    rng-rank{R}.json/.safetensors  one per process: torch CPU (+ CUDA), Python ``random``, numpy
    trainer_state.json             the caller's counters and metrics, the halokit and format versions
    COMPLETE                       written last; a directory without it is never loaded

Only safetensors and JSON are written or read, never a format that runs code when loaded. A state
dict is split into tensors (safetensors, keyed by their path such as ``state.3.exp_avg``) and JSON for
the rest, with tuples and non-string dict keys tagged so that ``load_state_dict`` gets back exactly what
``state_dict`` gave (``betas`` stays a tuple, param indices stay ints).

Atomicity: everything is written into ``checkpoints/.tmp-step-000123-<pid>/``, fsynced, marked COMPLETE
and renamed into place in one ``os.rename``. A run killed mid-write leaves only a ``.tmp-*`` directory,
which :func:`latest_checkpoint` ignores and :func:`cleanup_stale_tmp` removes. All processes must see
``RUN_DIR`` on a shared filesystem.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import halokit
from halokit.errors import UserError

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
_TMP = ".tmp-"
_STEP_DIR = re.compile(r"step-(\d+)")
_TAGS = ("__tensor__", "__tuple__", "__items__")


def _no_barrier() -> None:
    pass


# ---- a code-free codec: tensors out by path, the rest as tagged JSON --------------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors go into ``tensors`` under their dotted ``path``."""
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two entries of a state dict map to the tensor key {path!r}")
        tensors[path] = obj
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        # JSON keys are strings; optimizer state is keyed by int parameter index.
        return {"__items__": [[_encode(k, path, {}), _encode(v, _join(path, k), tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"{path or 'state'}: a {type(obj).__name__} cannot be stored in a checkpoint "
        "(only tensors, numbers, strings, bools, None, lists, tuples and dicts can)"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if obj.keys() == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if obj.keys() == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if obj.keys() == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---- durable file writes ------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # works for files and (on POSIX) directories
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen:
            t = t.clone()  # tied weights: safetensors refuses tensors that share memory
        seen.add(storage)
        out[key] = t.contiguous()
    save_file(out, str(path))
    _fsync(path)


def _split(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` as (tagged JSON, tensors by dotted path such as ``state.3.exp_avg``)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, "", tensors), tensors


def _write_state(folder: Path, name: str, encoded: Any, tensors: dict[str, torch.Tensor]) -> None:
    """``name.json`` always, ``name.safetensors`` when the state holds tensors."""
    if tensors:
        _write_tensors(folder / f"{name}.safetensors", tensors)
    _write_bytes(folder / f"{name}.json", json.dumps(encoded, indent=1).encode())


def _read_state(folder: Path, name: str) -> Any:
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


# ---- random number generators -------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:  # only a run that imported numpy can depend on its global RNG
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = (name, keys.tolist(), pos, has_gauss, cached)
    return state


def restore_rng(path: str | Path, process_index: int = 0) -> bool:
    """Set this process's torch, CUDA, Python and numpy global RNGs to the ones saved in checkpoint ``path``.

    Call it again *after* building a new data iterator: creating one draws from the global torch RNG.
    Returns False, with a warning, when the checkpoint holds no state for ``process_index`` (it was
    written by fewer processes); random draws then differ from the original run.
    """
    path = Path(path)
    name = f"rng-rank{process_index}"
    if not (path / f"{name}.json").exists():
        warnings.warn(f"{path} holds no RNG state for process {process_index}; random draws will differ "
                      "from the original run", stacklevel=2)
        return False
    state = _read_checked(path, lambda: _read_state(path, name))
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name_, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name_, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


# ---- saving -------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at optimizer step ``step``: ``step-000123``."""
    return f"step-{step:06d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    keep: int = 2,
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] = _no_barrier,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step-{step:06d}`` atomically and keep only the newest ``keep``.

    Every process calls this with the same ``step``; ``barrier`` (e.g. ``accelerator.wait_for_everyone``)
    separates the phases: the main process (index 0) makes the temp dir; each process writes its RNG
    state; the main process writes the rest, fsyncs, writes COMPLETE, renames, prunes. ``model_state``,
    ``optimizer``, ``scheduler`` and ``trainer_state`` are read on the main process only.

    Raises UserError if the directory cannot be written (disk full, permissions), after removing the
    partial checkpoint, or if ``model_state`` holds NaN/Inf (checked on every process that passes it, so
    all raise together); earlier checkpoints are untouched. Raises TypeError if a state holds a value
    that JSON and safetensors cannot store (say, a function inside a scheduler's state).
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = Path(run_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    main = process_index == 0
    bad = next((n for n, t in model_state.items() if t.is_floating_point() and not t.isfinite().all()), None)
    if bad is not None:  # a diverged update; resuming from it could only give NaN again
        last = latest_checkpoint(run_dir)
        where = f"the last good checkpoint is {last}" if last else "there is no earlier checkpoint"
        raise UserError(f"training diverged: at step {step} the weights hold NaN or Inf (first: {bad}); this "
                        f"checkpoint was not written and {where} (lower train.lr?)")
    if main:  # encode first, so a bad state fails before anything touches the disk
        parts = {name: _split(obj) for name, obj in [
            ("optimizer", optimizer.state_dict()),
            ("scheduler", scheduler.state_dict()),
            ("trainer_state", _trainer_meta(step, num_processes, trainer_state)),
        ]}
        if parts["trainer_state"][1]:
            raise TypeError(f"{next(iter(parts['trainer_state'][1]))}: store a number, not a tensor")
        tmp = root / f"{_TMP}{final.name}-{os.getpid()}"
        with _removed_on_error(tmp, step, root):
            root.mkdir(parents=True, exist_ok=True)
            for leftover in root.glob(f"{_TMP}{final.name}-*"):
                shutil.rmtree(leftover)
            tmp.mkdir()
    barrier()
    if not main:
        tmp = _find_tmp(root, final.name, process_index)
    with _removed_on_error(tmp if main else None, step, root):
        _write_state(tmp, f"rng-rank{process_index}", *_split(_rng_state()))
    barrier()
    if main:
        with _removed_on_error(tmp, step, root):
            _write_tensors(tmp / "model.safetensors", model_state)
            for name, (encoded, tensors) in parts.items():
                _write_state(tmp, name, encoded, tensors)
            _write_bytes(tmp / COMPLETE, b"")
            _fsync(tmp)
            _publish(tmp, final)
        _prune(root, keep, final)
    barrier()
    return final


def _trainer_meta(step: int, num_processes: int, trainer_state: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "halokit_version": halokit.__version__, "step": step,
            "num_processes": num_processes, "trainer_state": trainer_state}


@contextmanager
def _removed_on_error(tmp: Path | None, step: int, root: Path) -> Iterator[None]:
    """On any exception remove ``tmp``; turn an OSError into the UserError the CLI prints."""
    try:
        yield
    except BaseException as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(error, OSError):
            raise
        last = latest_checkpoint(root.parent)
        where = f"the last good checkpoint is {last}" if last else "there is no earlier checkpoint"
        raise UserError(f"checkpoint at step {step} could not be written to {root} "
                        f"({error.strerror or error}); {where}") from error


def _find_tmp(root: Path, name: str, process_index: int) -> Path:
    found = list(root.glob(f"{_TMP}{name}-*"))
    if len(found) != 1:
        raise UserError(f"process {process_index} sees {len(found)} temp checkpoint dirs for {name} in {root}; "
                        "the run directory must be on a filesystem that all processes share")
    return found[0]


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` from an earlier attempt is replaced."""
    aside = final.with_name(f"{_TMP}replaced-{final.name}-{os.getpid()}")
    replaced = final.exists()
    if replaced:
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if replaced:
            os.rename(aside, final)
        raise
    _fsync(final.parent)
    if replaced:
        shutil.rmtree(aside, ignore_errors=True)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every COMPLETE checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / COMPLETE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: Path, keep: int, just_written: Path) -> None:
    checkpoints = _complete_checkpoints(root)
    doomed = [p for _, p in checkpoints if p != just_written][: max(0, len(checkpoints) - keep)]
    for path in doomed:
        # Rename first: a half-deleted directory must never look like a checkpoint.
        trash = path.with_name(f"{_TMP}pruned-{path.name}-{os.getpid()}")
        try:
            os.rename(path, trash)
            shutil.rmtree(trash)
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {path} ({e.strerror or e})", stacklevel=3)


# ---- finding and loading ------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The COMPLETE checkpoint with the highest step under ``RUN_DIR/checkpoints``, or None.

    Temp directories (``.tmp-*``) and step directories without a COMPLETE marker are ignored.
    """
    checkpoints = _complete_checkpoints(Path(run_dir) / "checkpoints")
    return checkpoints[-1][1] if checkpoints else None


def cleanup_stale_tmp(run_dir: str | Path) -> list[Path]:
    """Remove the ``.tmp-*`` directories a killed run left under ``RUN_DIR/checkpoints``; return them.

    Call it on the main process while holding the :class:`RunLock`, before the first save.
    """
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.glob(f"{_TMP}*") if p.is_dir()) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def _read_checked(path: Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e})") from e


def load_checkpoint(
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    process_index: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore ``optimizer``, ``scheduler`` and this process's RNGs from checkpoint ``path`` in place.

    Returns ``(model_state, trainer_state)``: the saved tensors (on CPU) for ``model.load_state_dict``
    and the caller's dict as it was saved. Raises UserError when ``path`` is not a complete checkpoint,
    a file is unreadable, it was written by a newer format, or it does not fit ``optimizer``.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path} is not a complete halokit checkpoint (it has no {COMPLETE} marker)")
    meta = _read_checked(path, lambda: _read_state(path, "trainer_state"))
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION or "trainer_state" not in meta:
        raise UserError(f"checkpoint {path} has format {fmt!r}, which halokit {halokit.__version__} cannot read "
                        f"(it reads format {FORMAT_VERSION})")
    model_state = _read_checked(path, lambda: load_file(str(path / "model.safetensors")))
    optimizer_state = _read_checked(path, lambda: _read_state(path, "optimizer"))
    scheduler_state = _read_checked(path, lambda: _read_state(path, "scheduler"))
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} does not fit this optimizer ({e}); was the model, LoRA or "
                        "optimizer config changed since it was written?") from e
    scheduler.load_state_dict(scheduler_state)
    restore_rng(path, process_index)
    return model_state, meta["trainer_state"]

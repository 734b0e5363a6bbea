"""GGUF files: checked before transformers reads them, and parsed once per load.

transformers reads a GGUF checkpoint with the ``gguf`` package; halokit only checks the file first (a
truncated download must be one line, not a traceback) and keeps transformers from parsing it several times.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

from halokit.errors import UserError
from halokit.lora import _first_line

_active = False  # a gguf_parsed_once() block is open (nested blocks share it)


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block a GGUF file is parsed once, however often transformers opens it.

    Loading a model and its tokenizer from one GGUF file makes transformers build a ``gguf.GGUFReader`` three
    times (config, weights, tokenizer) — each parses every metadata field, ~50k vocabulary strings one numpy
    view at a time — halokit a fourth for :func:`check_gguf`, and transformers rebuilds gguf's tensor-name
    table for every module of the model (~400 times). Both are pure functions of their arguments (the reader
    of an unchanged file, the table of an architecture and a layer count), so inside the block they are
    cached: SmolLM2-135M from GGUF loads (model and tokenizer) in ~24 s instead of ~54 s on a slow core.
    Nested blocks share the outer cache; the ``gguf`` module is restored on exit. Without the gguf package
    this does nothing.
    """
    global _active
    try:
        import gguf
    except ImportError:
        gguf = None
    if gguf is None or _active:
        yield
        return
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def reader(path, mode="r"):
        stat = os.stat(path)  # the same file under any spelling of its path, as long as it is unchanged
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    _active = True
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        _active = False


def check_gguf(file: Path) -> None:
    """Refuse a missing, unreadable or truncated GGUF file (UserError naming it), or a missing gguf package."""
    if not file.is_file():
        raise UserError(f"{file}: GGUF file not found")
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise UserError(f"{file}: reading GGUF needs the gguf package (pip install 'halokit[gguf]')") from err
    try:
        reader = GGUFReader(str(file))
    except Exception as err:  # any parse failure of this untrusted file means the file is bad
        raise UserError(f"{file}: unreadable GGUF file, truncated or corrupt ({_first_line(err)})") from err
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:  # the reader silently returns short views past EOF
            raise UserError(f"{file}: truncated GGUF file (tensor {tensor.name} is incomplete)")

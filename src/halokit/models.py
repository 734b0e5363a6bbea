"""Loading models and tokenizers: local directories, Hub ids (when online), GGUF files, tiny configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from halokit.errors import UserError


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local directory, a Hub id, a GGUF file, or ``"byte"`` (halokit's byte-level one).

    Raises UserError (not a traceback) when it cannot be found or read.
    """
    if name_or_path == "byte":
        from halokit.data.tokenizer import byte_level_tokenizer

        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        gguf_file, name_or_path = path.name, str(path.parent)
    looks_local = path.exists() or name_or_path.startswith((".", "/")) or path.suffix
    if looks_local and not Path(name_or_path).exists():
        raise UserError(f"{name_or_path}: tokenizer path not found")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name_or_path}: cannot load a tokenizer ({first})") from err

"""Reading files without running code.

A pickle can name any function and have the unpickler call it, so a crafted ``.pt`` / ``.pkl`` file runs code when
``torch.load(weights_only=False)`` reads it. Every pickle this project reads goes through torch's weights-only
unpickler, which builds tensors, numbers, strings and plain containers (dict, list, tuple, OrderedDict) and refuses
anything else: ``load_weights_only`` for our own files, ``weights_only_torch_load`` around a library call that would
unpickle with ``weights_only=False`` itself (DeepSpeed's checkpoint loader). Tensors are otherwise written as
safetensors and everything else as JSON, neither of which can run code; ``parse_json`` and ``read_json`` name the file
(and the field) whose text is not JSON.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import torch


class UnsafeFileError(ValueError):
    """A file that holds something other than tensors and plain data (or is not a torch file): it was not loaded."""


def _refusal(path, what: str, error: Exception) -> UnsafeFileError:
    if isinstance(error, pickle.UnpicklingError):
        why = (f"holds something other than tensors, numbers and strings, so it was not loaded (unpickling it could "
               f"run code; torch's weights-only unpickler said: {str(error).splitlines()[0][:200]})")
    elif isinstance(error, EOFError) or "zip archive" in str(error):  # cut short: torch's reader ends in its zip index
        why = f"is truncated or damaged (not a complete torch file: {str(error).split('. ')[0][:200]})"
    else:
        why = f"cannot be read as a torch file ({type(error).__name__}: {str(error)[:200]})"
    return UnsafeFileError(f"{what} {str(path)!r} {why}; delete it or replace it with a file this project wrote")


def parse_json(text: str, where: str):
    """``json.loads(text)``; text that is not JSON raises ``ValueError``, one sentence naming ``where`` (a file, or a
    field of a file's metadata)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None


def read_json(path: str | Path, what: str = "file"):
    """The JSON value in the file ``path``; garbage raises ``ValueError`` naming ``what`` and the path."""
    where = f"{what} {str(path)!r}"
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not valid JSON (not UTF-8 text: {e.reason})") from None
    return parse_json(text, where)


def load_weights_only(path: str | Path, what: str = "file"):
    """``torch.load(path)`` on the CPU through the weights-only unpickler; a file holding anything else (or no torch
    file at all) raises ``UnsafeFileError``, one sentence naming ``what`` and the path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise _refusal(path, what, e) from None


@contextlib.contextmanager
def weights_only_torch_load(allowed: tuple = (), what: str = "checkpoint file"):
    """Within: every ``torch.load`` call, also one a library makes with ``weights_only=False``, uses the weights-only
    unpickler with the classes ``allowed`` added (plain records such as DeepSpeed's loss scaler); a file holding
    anything else raises ``UnsafeFileError``."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(list(allowed)):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise _refusal(f, what, e) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original

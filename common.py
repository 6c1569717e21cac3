"""Small shared pieces: input errors, safe unpickling, atomic writes, the preprocessing cache."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(Exception):
    """Bad input data. The message is one line: `file:line: what was expected`."""


def data_error(path: str | os.PathLike, line: int | None, what: str) -> DataError:
    where = f"{path}:{line}" if line is not None else f"{path}"
    return DataError(f"{where}: {what}")


def exit_on_data_error(main):
    """Decorator for entry points: data errors end the run with one line and exit code 2, no traceback."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    wrapped.__doc__ = main.__doc__
    return wrapped


# --------------------------------------------------------------------------- safe pickles

# indexer.pkl and offsets files come with the data, often from elsewhere. A plain pickle.load would run
# any code they carry, so only plain containers are allowed to be rebuilt.
_ALLOWED_GLOBALS = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bytes"), ("builtins", "bool"),
    ("collections", "defaultdict"), ("collections", "OrderedDict"),
}


# Opt-in for numeric arrays (the real emb_81_32.pkl maps creative ids to numpy vectors): exactly the functions
# numpy's own pickles call to rebuild an array or a scalar from a dtype and raw bytes. They run no other code,
# and the elements of an object array still go through find_class, so the allowlist above still binds.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),  # pickled by numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),  # pickled by numpy 2.x
}


class _RestrictedUnpickler(pickle.Unpickler):
    allowed = _ALLOWED_GLOBALS

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain containers, numbers and strings are allowed")


def iter_line_blocks(f: io.BufferedIOBase, chunk_bytes: int) -> Iterator[bytes]:
    """Blocks of whole lines, about chunk_bytes each, from a binary file (bounded memory); a last line
    without a newline ends the last block."""
    rest = b""
    while True:
        block = f.read(chunk_bytes)
        buf = rest + block
        if not buf:
            return
        end = buf.rfind(b"\n") + 1 if block else len(buf)
        if end:
            yield buf[:end]
        rest = buf[end:]


def safe_torch_load(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True: a checkpoint from elsewhere is data, never code. Anything it refuses
    (or cannot read) is one DataError line."""
    import torch  # here, not at the top: preprocessing never needs torch

    try:
        # mmap: every rank of a resumed run maps the one file instead of reading its own copy into memory
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        why = " ".join(str(e).split())
        if "weights only load failed" in why.lower():
            detail = re.search(r"unsupported global \S+", why, re.IGNORECASE)
            why = "refused: rebuilding it would run code" + (f" ({detail.group(0)})" if detail else "")
        raise data_error(path, None, f"not a loadable checkpoint: {why[:300]}") from None


def safe_load_pickle(path: str | os.PathLike, allow_numpy_arrays: bool = False) -> Any:
    """Load a pickle of plain containers/numbers/strings (with `allow_numpy_arrays`, also numpy arrays and
    scalars); anything that could run code is refused."""
    path = Path(path)
    if not path.exists():
        raise data_error(path, None, "file not found")
    try:
        with open(path, "rb") as f:
            up = _RestrictedUnpickler(io.BufferedReader(f))
            if allow_numpy_arrays:
                up.allowed = _ALLOWED_GLOBALS | _NUMPY_GLOBALS
            return up.load()
    except pickle.UnpicklingError as e:
        raise data_error(path, None, f"unsafe or invalid pickle ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise data_error(path, None, f"not a valid pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Write to a temp file beside `path`, fsync, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def atomic_save_pickle(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def atomic_save_npy(arr: Any, path: str | os.PathLike) -> None:
    import numpy as np

    with atomic_write(path, "wb") as f:
        np.save(f, arr)


# --------------------------------------------------------------------------- preprocessing cache

STAT_FILE = "stat.json"


def load_stat(cache_dir: str | os.PathLike) -> dict:
    """Read the statistics get_stat.py wrote (schema, counts); a clear error if it has not run."""
    path = Path(cache_dir) / STAT_FILE
    if not path.exists():
        raise data_error(path, None, "missing: run get_stat.py first (./run.sh does)")
    with open(path) as f:
        return json.load(f)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every option's default (unless its help names it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return text
        shown = action.default
        if isinstance(shown, (list, tuple)):
            shown = " ".join(map(str, shown))
        return text + f" (default: {shown if shown != '' else 'none'})".replace("%", "%%")


def env_default(name: str, fallback: str) -> str:
    """Paths come from the environment (DESIGN §2); a command-line option beats the variable."""
    return os.environ.get(name) or fallback

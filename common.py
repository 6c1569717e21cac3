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
from collections.abc import Iterable, Iterator
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


def iter_line_blocks(f: io.BufferedIOBase, chunk_bytes: int, limit: int | None = None) -> Iterator[bytes]:
    """Blocks of whole lines, about chunk_bytes each, from a binary file (bounded memory); a last line
    without a newline ends the last block. With `limit`, at most that many bytes from the current position
    (a byte range that ends at a line boundary)."""
    rest = b""
    while True:
        n = chunk_bytes if limit is None else min(chunk_bytes, limit)
        block = f.read(n) if n > 0 else b""
        if limit is not None:
            limit -= len(block)
        if not block:
            if rest:
                yield rest
            return
        end = block.rfind(b"\n") + 1
        if end:
            yield rest + block[:end] if rest else block[:end] if end < len(block) else block  # one copy at most
            rest = block[end:]
        else:
            rest += block  # a line longer than the chunk


def write_int_list_pickle(f: io.BufferedIOBase, arrays: Iterable[Any]) -> None:
    """Pickle a list of ints that arrive as int64 arrays, without building the list: the opcodes pickle.dump
    writes for a list (protocol 4, appends in batches of 1000), so pickle.load and safe_load_pickle read it
    back as a plain list. The bytes depend on the ints alone, not on how they were split into arrays."""
    import numpy as np

    small = np.dtype([("op", "u1"), ("v", "<i4")])  # BININT: a 4-byte signed int
    large = np.dtype([("op", "u1"), ("n", "u1"), ("v", "<i8")])  # LONG1 of 8 bytes: any int64

    def batch(b: np.ndarray) -> bytes:
        fits = b.min() >= -2**31 and b.max() < 2**31
        rec = np.empty(len(b), small if fits else large)
        rec["op"], rec["v"] = (ord("J"), b) if fits else (0x8A, b)
        if not fits:
            rec["n"] = 8
        return b"(" + rec.tobytes() + b"e"  # MARK, the ints, APPENDS

    f.write(b"\x80\x04]")  # PROTO 4, EMPTY_LIST
    rest = np.zeros(0, np.int64)
    for a in arrays:
        rest = np.concatenate([rest, np.asarray(a, np.int64)])
        full = len(rest) // 1000 * 1000
        for s in range(0, full, 1000):
            f.write(batch(rest[s:s + 1000]))
        rest = rest[full:]
    if len(rest):
        f.write(batch(rest))
    f.write(b".")


def iter_int_list_pickle(path: str | os.PathLike, batch: int = 1 << 16) -> Iterator[Any]:
    """The ints of a pickled list of ints as int64 arrays of up to `batch`, read opcode by opcode from a
    memory map (nothing is executed, and memory is bounded by `batch`). A pickle of another shape is loaded
    whole by safe_load_pickle (which names what is wrong with it) when that shows before the first batch."""
    import mmap
    import struct

    import numpy as np

    fixed = {0x4A: struct.Struct("<i"), 0x4B: struct.Struct("<B"), 0x4D: struct.Struct("<H")}  # BININT, 1, 2
    skip = {0x28: 0, 0x61: 0, 0x65: 0, 0x94: 0, 0x71: 1, 0x72: 4}  # MARK, APPEND(S), MEMOIZE, (LONG_)BINPUT
    buf, started, listed, pos = [], False, False, 0
    with open(path, "rb") as f, contextlib.suppress(ValueError):  # an empty file cannot be mapped
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            n = len(mm)
            try:
                while pos < n:
                    op = mm[pos]
                    pos += 1
                    s = fixed.get(op)
                    if s is not None and listed:
                        buf.append(s.unpack_from(mm, pos)[0])
                        pos += s.size
                    elif op == 0x8A and listed:  # LONG1: a length byte, then little-endian two's complement
                        k = mm[pos]
                        buf.append(int.from_bytes(mm[pos + 1:pos + 1 + k], "little", signed=True))
                        pos += 1 + k
                    elif op in (0x49, 0x4C) and listed:  # INT, LONG: decimal text to a newline
                        end = mm.find(b"\n", pos)
                        buf.append(int(mm[pos:end].rstrip(b"L")))
                        pos = end + 1
                    elif op in skip and listed:
                        pos += skip[op]
                    elif op == 0x5D and not listed:  # EMPTY_LIST
                        listed = True
                    elif op in (0x80, 0x95) and not listed:  # PROTO, FRAME
                        pos += 1 if op == 0x80 else 8
                    elif op == 0x2E and listed:  # STOP
                        yield np.array(buf, np.int64)
                        return
                    else:
                        raise ValueError(f"opcode {op:#x} at byte {pos - 1}")
                    if len(buf) == batch:
                        yield np.array(buf, np.int64)
                        buf, started = [], True
                raise ValueError("no STOP opcode")
            except (ValueError, IndexError, struct.error) as e:
                if started:
                    raise data_error(path, None, f"expected a pickled list of ints ({e})") from None
    obj = safe_load_pickle(path)  # not the usual shape: whole, through the restricted unpickler
    try:
        yield np.asarray(obj if isinstance(obj, (list, tuple)) else None, np.int64)
    except (TypeError, ValueError, OverflowError):
        raise data_error(path, None, f"expected a list of ints, got {type(obj).__name__}") from None


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

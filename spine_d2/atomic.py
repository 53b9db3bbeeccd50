"""Writing outputs safely. A file's name only ever holds a whole file: it is written to a
temporary name beside it, then renamed over it (one filesystem operation), so a run killed half
way, or a writer that raises, leaves the previous file (or none) under the name, never half of
one. JSON is written strict (NaN as null). A folder that a batch tool fills has one writer at a
time (``single_writer``).

The package's writers, tools and benchmarks go through here rather than each its own
``path + ".tmp"``: a fixed temporary name is shared by two processes writing the same file (one
renames the other's half-written bytes into place), and a writer that raised left it behind.
(``tools/install_detectron2.py`` keeps its own ``.part`` names: it runs before this package can
be imported.)
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from .errors import OutputError, SpineError

PathLike = Union[str, "os.PathLike[str]"]


def temporary_name(path: PathLike) -> Path:
    """A name beside ``path`` for its bytes in progress: hidden (a ``*.png`` glob of the folder
    does not pick it up), unique to this process and call, and ending in ``path``'s own suffix
    because OpenCV, Matplotlib, NumPy and pydicom choose the format from it. A long name is
    cut to its first 100 bytes: file names end at 255 bytes, and a name that fits may not fit
    with the ~25 characters added."""
    path = Path(path)
    stem = path.name
    if len(stem.encode()) > 200:
        stem = stem.encode()[:100].decode(errors="ignore")
    return path.with_name(f".{stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


# The filesystem refuses more bytes: nothing this run can fix, and no bug to show a traceback of.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@contextmanager
def naming_write_errors(path: PathLike, advice: str = "") -> Iterator[None]:
    """Turn a full disk, an exhausted quota or a filesystem remounted read-only under the block
    into a one-line OutputError (a SpineError) naming ``path``, the output being written: the
    ``OSError`` of a failed ``write`` or ``flush`` names no file, and the tools print
    SpineErrors as one line. ``advice`` replaces the default "what now" that ends the line.
    Other OSErrors pass unchanged (an OutputError raised inside keeps its own, nearer name)."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:
        code = full_disk_errno(e)
        if code is None:
            raise
        advice = advice or (
            "the files written before it are whole; make room (or write elsewhere) and run again"
        )
        raise OutputError(f"{path}: cannot write it ({os.strerror(code)}): {advice}") from e


def full_disk_errno(e: BaseException) -> int | None:
    """The errno of a full disk behind ``e``: raised itself, or the cause of what was raised
    (``torch.save`` meets the OSError in its zip writer and raises a RuntimeError on top)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def atomic_path(path: PathLike, advice: str = "") -> Iterator[Path]:
    """Yield a temporary name to write ``path``'s content to; when the block ends it is renamed
    to ``path``, and when the block raises (interrupts included) it is removed and ``path`` is
    left as it was. For writers that take a file name (``torch.save``, ``cv2.imwrite``,
    ``fig.savefig``). A full disk is a one-line error (:func:`naming_write_errors`, which
    ``advice`` goes to)."""
    tmp = temporary_name(path)
    with naming_write_errors(path, advice):
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # read-only by now: the error that brought us here matters more
                pass
            raise


def sweep_temporaries(folder: PathLike, pattern: str, older_than_s: float = 900.0) -> list:
    """Remove the temporary files (``temporary_name``) of outputs matching ``pattern`` (a glob
    of final names, e.g. ``*.pth``) that a writer killed outright (SIGKILL, the OOM killer, a
    preempted job: no cleanup ran) left in ``folder``, and return their paths. Only those
    untouched for ``older_than_s``: a live writer's file grows, so its time is always recent."""
    now, removed = time.time(), []
    for tmp in Path(folder).glob(f".{pattern}.*-*.tmp*"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            pass
    return removed


@contextmanager
def atomic_open(path: PathLike, mode: str = "w", advice: str = "", **kwargs):
    """``open(path, mode)`` for writing through :func:`atomic_path`; text defaults to UTF-8."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, advice) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """``data`` (bytes, or text written as UTF-8) to ``path`` through a temporary name."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def json_safe(obj):
    """``obj`` with NaN / inf (COCO's APl with no large objects, a mean of no values) as None:
    strict JSON has no NaN, and browsers, jq and most readers outside Python refuse it."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def write_json(path: PathLike, obj, indent=1) -> str:
    """``obj`` as strict JSON (see :func:`json_safe`) to ``path`` through a temporary name;
    returns the text written."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False)
    write_atomic(path, text + ("\n" if indent is None else ""))
    return text


@contextmanager
def single_writer(lock: PathLike, what: str):
    """Hold an exclusive lock on the file ``lock`` while the block runs, so that a second
    process about to write the same outputs (a job started twice, a retry while the first one
    still runs) gets a one-line SpineError instead of interleaving its appends and renames
    with the first one's. The kernel's ``flock`` is released when the holder ends, killed
    included, so no stale lock outlives a crash; the file itself names the holder (pid and
    host) for the message and is removed on release. Where ``fcntl`` is missing (Windows) the
    block runs unguarded."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    lock = Path(lock)
    while True:
        f = open(lock, "a+", encoding="utf-8")  # "a+": never truncates what the holder wrote
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = " ".join(f.read().split()[:2])
            f.close()
            who = f"pid {holder.replace(' ', ' on ')}" if holder else "a process"
            raise SpineError(
                f"{lock.parent}: another {what} is writing here ({who}; {lock.name}): "
                "wait for it to end"
            ) from None
        except OSError as e:  # a filesystem without locks (some NFS mounts)
            f.close()
            lock.unlink(missing_ok=True)
            logging.getLogger(__name__).warning(
                "%s: cannot lock (%s): nothing stops a second %s writing here", lock, e, what
            )
            f = None
            break
        try:  # the holder before us may have removed the file between our open and our lock
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    if f is None:
        yield
        return
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: see the inode check above
        f.close()

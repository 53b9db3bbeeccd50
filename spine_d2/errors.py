"""Project exceptions: each names the file (or record) and what is wrong with it, in one line."""


class SpineError(Exception):
    """Base class; tools catch it at the top, print ``str(e)`` and exit non-zero."""


class OutputError(SpineError):
    """An output that cannot be written because the filesystem takes no more (full, over quota,
    remounted read-only): a batch stops at it, since every later item would fail the same way."""


class ScanReadError(SpineError):
    """A scan file that cannot be read as an image."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(SpineError):
    """An invalid dataset file or record (COCO json, image reference, annotation)."""

    def __init__(self, source, reason):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class CheckpointError(SpineError):
    """A model weights file that is missing, corrupt, or not the file its manifest describes."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def run_cli(main, prog: str) -> None:
    """Exit with ``main()``'s status; a SpineError ends the program with one line,
    ``<prog>: error: <what is wrong>``, and status 1 instead of a traceback. A ``main`` that
    returns its result (the benchmarks return their JSON dict) succeeded: status 0, where
    ``sys.exit(dict)`` would print the dict to stderr and exit 1."""
    import sys

    try:
        status = main()
    except SpineError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        status = 1
    sys.exit(status if isinstance(status, int) else 0)


def one_line(e: Exception) -> str:
    """An exception's message on one line (a KeyError's without its quotes), for messages
    that quote a library's reason."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split()) or type(e).__name__


def torch_load_reason(e: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, on one line. Its unpickling errors
    open with a paragraph on PyTorch 2.6's default that ends "Re-running with weights_only
    False will likely succeed", advice that is wrong for a file that holds no checkpoint and
    unsafe for one from elsewhere: keep only the unpickler's own reason."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        return f"torch.load with weights_only refused it: {' '.join(detail.split())}"
    return text.splitlines()[0] if text else type(e).__name__


def check_output_folder(path) -> None:
    """A one-line SpineError when the folder ``path`` cannot be made or written: it, or the
    nearest part of it that exists, is a file (os.makedirs would raise FileExistsError or
    NotADirectoryError later, mid-run), or that folder is not writable (a read-only mount, another
    user's folder: PermissionError or OSError EROFS at the first file). Nothing is created here."""
    import os
    from pathlib import Path

    wanted = Path(path)
    for part in (wanted, *wanted.parents):
        if part.exists():
            where = "" if part == wanted else f" (wanted as a folder for {wanted})"
            if not part.is_dir():
                raise SpineError(f"{part}: exists and is not a folder{where}")
            if not os.access(part, os.W_OK | os.X_OK):
                raise SpineError(f"{part}: folder is not writable{where}")
            return

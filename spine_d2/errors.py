"""Project exceptions: each names the file (or record) and what is wrong with it, in one line."""


class SpineError(Exception):
    """Base class; tools catch it at the top, print ``str(e)`` and exit non-zero."""


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
    ``<prog>: error: <what is wrong>``, and status 1 instead of a traceback."""
    import sys

    try:
        status = main()
    except SpineError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        status = 1
    sys.exit(status)

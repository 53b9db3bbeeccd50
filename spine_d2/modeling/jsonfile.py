"""Reading and writing the small JSON files that hold fitted model parts (the level prior, the
rescorer): one-line errors naming the file, atomic writes, one entry per line for diffs."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_atomic
from ..errors import SpineError, check_output_folder

__all__ = ["read_model_json", "write_model_json"]


def read_model_json(path, what: str, fmt: str, writer: str) -> dict:
    """The JSON object in ``path`` whose "format" is ``fmt``; otherwise a one-line SpineError
    naming the file. ``what`` names the part in messages, ``writer`` the tool that writes one."""
    path = Path(path)
    if not path.is_file():
        raise SpineError(f"{path}: {what} file not found ({writer} writes one)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpineError(f"{path}: not a JSON {what} ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise SpineError(f"{path}: not a {what} (format is not {fmt!r})")
    return data


def write_model_json(path, head: dict, key: str, body: str) -> None:
    """``head``'s keys, then ``key`` holding ``body`` (JSON text already laid out, e.g. one
    entry per line so that a refit reads as a diff), written to a temporary name and renamed:
    a crash never leaves half a file."""
    path = Path(path)
    check_output_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    opening = json.dumps(head, indent=1)[:-2]  # without the closing "\n}"
    write_atomic(path, f"{opening},\n {json.dumps(key)}: {body}\n}}\n")

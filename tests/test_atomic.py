"""spine_d2.atomic: a file's name holds the old file or the whole new one, never a part."""

import errno
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from spine_d2.atomic import (
    atomic_open,
    atomic_path,
    naming_write_errors,
    temporary_name,
    write_atomic,
    write_json,
)
from spine_d2.errors import OutputError, SpineError


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, "{}")
    write_atomic(path, b'{"a": 1}')
    assert path.read_bytes() == b'{"a": 1}'
    write_atomic(path, "n\u00e4me")  # text is UTF-8 whatever the locale
    assert path.read_bytes() == "n\u00e4me".encode("utf-8")
    assert _names(tmp_path) == ["summary.json"]


@pytest.mark.parametrize("error", [ValueError("encoder failed"), KeyboardInterrupt()])
def test_a_writer_that_raises_keeps_the_old_file_and_removes_its_part(tmp_path, error):
    path = tmp_path / "report.md"
    path.write_text("old report")
    with pytest.raises(type(error)):
        with atomic_open(path) as f:
            f.write("half a new rep")
            raise error
    assert path.read_text() == "old report"
    assert _names(tmp_path) == ["report.md"]


def test_a_writer_that_raises_before_writing_anything(tmp_path):
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "w.pth"):
            raise OSError("disk full")
    assert _names(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, code):
    path = tmp_path / "report.md"
    path.write_text("old report")
    unlink = Path.unlink

    def unlink_read_only(self, missing_ok=False):  # a read-only remount refuses the cleanup too
        if code == errno.EROFS:
            raise OSError(code, os.strerror(code), str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink_read_only)
    with pytest.raises(SpineError) as e:
        with atomic_open(path) as f:
            f.write("half a new rep")
            raise OSError(code, os.strerror(code))  # what a failing write() raises: no file name
    assert str(e.value).startswith(f"{path}: cannot write it ({os.strerror(code)})")
    assert "\n" not in str(e.value)
    assert path.read_text() == "old report"
    if code != errno.EROFS:
        assert _names(tmp_path) == ["report.md"]


def test_other_os_errors_pass_unchanged(tmp_path):
    with pytest.raises(PermissionError):
        with naming_write_errors(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))


def test_a_full_disk_under_another_error_is_still_one_line(tmp_path):
    # torch.save meets ENOSPC in its zip writer and raises a RuntimeError on top of it; an
    # inner writer's line names its own file, not the outer block's
    with pytest.raises(OutputError, match=r"x\.pth: cannot write it \(No space left"):
        with naming_write_errors(tmp_path / "x.pth"):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
    with pytest.raises(OutputError, match=r"inner\.json: cannot write it"):
        with naming_write_errors(tmp_path):
            with naming_write_errors(tmp_path / "inner.json"):
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(RuntimeError, match="something else"):
        with naming_write_errors(tmp_path / "x.pth"):
            raise RuntimeError("something else")


def test_two_writers_of_one_file_do_not_share_a_temporary_name(tmp_path):
    # A fixed "<name>.tmp" let the second writer truncate the first one's bytes in progress
    # and rename them into place; each writer now has its own, and the last to finish wins.
    path = tmp_path / "manifest.jsonl"
    with atomic_open(path) as first:
        first.write("first writer's whole file\n")
        with atomic_open(path) as second:
            second.write("second\n")
        assert path.read_text() == "second\n"
    assert path.read_text() == "first writer's whole file\n"
    assert _names(tmp_path) == ["manifest.jsonl"]


def test_temporary_names_are_hidden_unique_and_keep_the_suffix(tmp_path):
    a, b = temporary_name(tmp_path / "scan.png"), temporary_name(tmp_path / "scan.png")
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(".scan.png.") and a.suffix == ".png"
    assert not list(tmp_path.glob("*.png"))  # a glob of the outputs never sees one


def test_a_name_near_the_filesystem_limit(tmp_path):
    path = tmp_path / ("1.2.840.10008." * 17 + "scan.png")  # 242 characters, as UIDs make them
    write_atomic(path, b"png bytes")
    assert path.read_bytes() == b"png bytes" and _names(tmp_path) == [path.name]
    assert temporary_name(path).suffix == ".png"
    wide = tmp_path / ("\u6905\u9aa8" * 40 + ".png")  # 244 bytes of UTF-8 in 84 characters
    write_atomic(wide, b"x")
    assert wide.read_bytes() == b"x"


def test_writers_that_pick_the_format_from_the_name(tmp_path):
    img = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    with atomic_path(tmp_path / "scan.png") as tmp:
        assert cv2.imwrite(str(tmp), img)  # OpenCV needs the .png to choose PNG
    back = cv2.imread(str(tmp_path / "scan.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, img)
    with atomic_path(tmp_path / "arrays.npz") as tmp:
        np.savez(tmp, x=img)  # NumPy appends .npz to a name without it
    assert np.array_equal(np.load(tmp_path / "arrays.npz")["x"], img)
    assert _names(tmp_path) == ["arrays.npz", "scan.png"]


def test_atomic_open_writes_whole_files_only(tmp_path):
    with pytest.raises(ValueError, match="mode 'w' or 'wb', not 'a'"):
        with atomic_open(tmp_path / "log.jsonl", "a"):
            pass


def test_write_json_is_strict_json(tmp_path):
    import json

    path = tmp_path / "summary.json"
    text = write_json(
        path,
        {"psnr_gain_db": float("nan"), "ap": [np.float32(61.5), float("inf")], "n": np.int64(3)},
    )
    assert json.loads(path.read_text()) == {"psnr_gain_db": None, "ap": [61.5, None], "n": 3}
    assert "NaN" not in text and "Infinity" not in text
    line = write_json(tmp_path / "bench.json", {"x": float("-inf")}, indent=None)
    assert line == '{"x": null}' and (tmp_path / "bench.json").read_text() == line + "\n"


def test_single_writer_refuses_a_second_writer_until_the_first_ends(tmp_path):
    from spine_d2.atomic import single_writer
    from spine_d2.errors import SpineError

    lock = tmp_path / ".export.lock"
    with single_writer(lock, "ZOI export"):
        with pytest.raises(SpineError, match=r"another ZOI export is writing here \(pid \d+ on "):
            with single_writer(lock, "ZOI export"):
                pass
    assert _names(tmp_path) == []  # released and removed
    with single_writer(lock, "ZOI export"):  # free again
        pass


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from spine_d2.atomic import single_writer
    from spine_d2.errors import SpineError

    lock = tmp_path / ".export.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom spine_d2.atomic import single_writer\n"
         f"with single_writer({str(lock)!r}, 'ZOI export'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SpineError, match=f"pid {holder.pid} on "):
            with single_writer(lock, "ZOI export"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists()  # killed: it could not remove the file, but the kernel freed the lock
    with single_writer(lock, "ZOI export"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_a_filesystem_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from spine_d2.atomic import single_writer

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level("WARNING"):
        with single_writer(tmp_path / ".export.lock", "ZOI export"):
            ran.append(True)
    assert ran and _names(tmp_path) == []
    assert "cannot lock" in caplog.text and "nothing stops a second ZOI export" in caplog.text


def test_a_full_disk_line_can_end_in_the_callers_advice(tmp_path):
    with pytest.raises(OutputError) as e:
        with naming_write_errors(tmp_path, "run again with --resume"):
            raise OSError(errno.ENOSPC, "No space left on device")
    reason = "cannot write it (No space left on device)"
    assert str(e.value) == f"{tmp_path}: {reason}: run again with --resume"

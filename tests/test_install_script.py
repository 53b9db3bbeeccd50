"""tools/install_detectron2.py refuses bad sdists with one line and exit code 1."""

import subprocess
import sys
import tarfile


def _run(*args):
    res = subprocess.run(
        [sys.executable, "tools/install_detectron2.py", "--wheel-only", *args],
        capture_output=True,
        text=True,
    )
    return res.returncode, res.stderr.strip().splitlines()


def test_missing_sdist(tmp_path):
    rc, err = _run("--sdist", str(tmp_path / "nope.tar.gz"))
    assert rc == 1 and len(err) == 1 and "nope.tar.gz: no such file" in err[0]


def test_sdist_with_wrong_checksum(tmp_path):
    fake = tmp_path / "pb1-detectron2-0.6.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(__file__, arcname="pb1-detectron2-0.6/setup.py")
    rc, err = _run("--sdist", str(fake), "-o", str(tmp_path / "wheels"))
    assert rc == 1 and len(err) == 1 and "does not match the pinned" in err[0]
    assert not (tmp_path / "wheels").exists()  # nothing built from an unverified archive

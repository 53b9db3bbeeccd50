#!/usr/bin/env python
"""Build and install a pure-Python Detectron2 v0.6 wheel from the registry's ``pb1-detectron2`` sdist.

Detectron2 is not published on PyPI under its own name. ``pb1-detectron2==0.6`` carries upstream
v0.6's Python sources (without the compiled ``_C`` ops, which Mask R-CNN does not need: torchvision
supplies roi_align and nms), but its setup.py cannot run: it lists a C++ source missing from the
sdist, imports torch at metadata time, and declares a direct-URL extra that pip rejects. So this
script fetches the sdist itself (sha256-pinned, cached), repackages the ``detectron2/`` package as
a wheel named ``detectron2`` (version ``0.6+spine.N``) with its model-zoo configs, applies the
compatibility fixes listed in ``FIXES`` and installs it with the running interpreter's pip.

Idempotent: it does nothing when the same build is already installed, and it keeps a detectron2
that has compiled ops (a user's own build from source) unless ``--force`` is given.

    python tools/install_detectron2.py                    # download (or reuse cache), build, install
    python tools/install_detectron2.py --sdist FILE.tar.gz  # fully offline from a local sdist
    python tools/install_detectron2.py --wheel-only -o dist/
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import html.parser
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Bump when FIXES or REQUIRES change so that existing installs are rebuilt.
BUILD = 1
VERSION = f"{SDIST_VERSION}+spine.{BUILD}"

# Real runtime dependencies of detectron2 0.6's Python code (the sdist pins black==21.4b2 and
# other dev-only or stale requirements). Ranges are the ones tested with this project.
REQUIRES = [
    "numpy>=1.23",
    "Pillow>=10",
    "matplotlib>=3.5",
    "pycocotools>=2.0.7",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate>=0.8",
    "cloudpickle>=1.6",
    "tqdm>4.29",
    "tensorboard>=2.10",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.2",
    "omegaconf>=2.1,<2.5",
    "hydra-core>=1.1",
    "packaging",
]

MISSING_OPS_MODULE = '''\
"""Added by spine-d2's pure-Python build: detectron2's compiled ops are optional.

Mask R-CNN needs none of them (torchvision provides roi_align and nms). Rotated-box ops,
deformable convolution and the C++ COCOeval only fail when they are actually called.
"""
try:  # a build from source that does ship the extension
    from detectron2 import _C  # noqa: F401

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    class _MissingOps:
        def __getattr__(self, name):
            raise RuntimeError(
                f"detectron2 compiled op '{name}' is not available: this detectron2 was built "
                "without C++/CUDA extensions (spine-d2's pure-Python build). Rotated boxes and "
                "deformable convolution need detectron2 built from source."
            )

    _C = _MissingOps()
'''


@dataclass(frozen=True)
class Fix:
    """One documented source fix: exact text replacements that must all apply."""

    path: str  # relative to the detectron2 package
    why: str
    replacements: tuple[tuple[str, str], ...] = ()
    regex: tuple[str, str] | None = None  # (pattern, replacement) applied to every .py file


FIXES = [
    Fix(
        "data/transforms/transform.py",
        "Pillow 10 removed Image.LINEAR (an alias of BILINEAR); it is a default argument, so "
        "`import detectron2.data` failed.",
        (("interp=Image.LINEAR", "interp=Image.BILINEAR"),),
    ),
    *[
        Fix(
            p,
            "The sdist has no compiled _C; import it through _compiled_ops so that importing the "
            "module works and only calling a compiled op raises a clear error.",
            (("from detectron2 import _C\n", "from detectron2._compiled_ops import _C\n"),),
        )
        for p in (
            "layers/deform_conv.py",
            "layers/roi_align_rotated.py",
            "layers/rotated_boxes.py",
            "evaluation/fast_eval_api.py",
        )
    ],
    Fix(
        "evaluation/coco_evaluation.py",
        "COCOEvaluator defaults to the C++ COCOeval_opt; fall back to pycocotools' COCOeval "
        "when the compiled ops are absent.",
        (
            (
                "from detectron2.evaluation.fast_eval_api import COCOeval_opt\n",
                "from detectron2._compiled_ops import AVAILABLE as _COMPILED_OPS\n"
                "from detectron2.evaluation.fast_eval_api import COCOeval_opt\n",
            ),
            (
                "self._use_fast_impl = use_fast_impl\n",
                "self._use_fast_impl = use_fast_impl and _COMPILED_OPS\n",
            ),
            (
                "coco_eval = (COCOeval_opt if use_fast_impl else COCOeval)",
                "coco_eval = (COCOeval_opt if use_fast_impl and _COMPILED_OPS else COCOeval)",
            ),
        ),
    ),
    Fix(
        "model_zoo/model_zoo.py",
        "pkg_resources is no longer shipped by current setuptools; the configs are package data "
        "next to this file.",
        (
            ("import pkg_resources\n", ""),
            (
                'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", '
                'os.path.join("configs", config_path)\n    )',
                'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", '
                "config_path)",
            ),
        ),
    ),
    Fix(
        "*",
        "NumPy 1.24 removed the aliases np.bool/np.int/np.float/np.object (used in "
        "structures/masks.py, data/build.py, evaluators, visualizer); they meant the builtins.",
        regex=(r"\bnp\.(bool|int|float|object)\b(?![_\d])", r"\1"),
    ),
]


class InstallError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_detectron2() -> tuple[str | None, bool]:
    """(version, has_compiled_ops) of the detectron2 visible to this interpreter, without importing
    it in this process (an import could fail half-way on a broken install)."""
    if importlib.util.find_spec("detectron2") is None:
        return None, False
    code = (
        "import importlib.util, detectron2;"
        "print(detectron2.__version__);"
        "print(importlib.util.find_spec('detectron2._C') is not None)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return "broken", False
    version, has_c = res.stdout.split()
    return version, has_c == "True"


class _LinkParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def index_url() -> str:
    """The package index pip itself would use (PIP_INDEX_URL, pip config, or PyPI)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
        )
        url = res.stdout.strip() if res.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def download_sdist(dest: Path) -> None:
    """Find the sdist on the simple index (PEP 503) and download it to ``dest`` atomically."""
    page_url = f"{index_url()}/{SDIST_NAME}/"
    log(f"looking up {SDIST_FILE} on {page_url}")
    try:
        with urllib.request.urlopen(page_url, timeout=60) as r:
            page = r.read().decode("utf-8", "replace")
    except OSError as e:
        raise InstallError(f"cannot reach the package index {page_url}: {e}") from e
    parser = _LinkParser()
    parser.feed(page)
    links = [l for l in parser.links if urllib.parse.urlsplit(l).path.endswith("/" + SDIST_FILE)]
    if not links:
        raise InstallError(f"{SDIST_FILE} is not listed on {page_url}")
    url = urllib.parse.urljoin(page_url, links[0]).split("#")[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"download of {url} failed: {e}") from e
    os.replace(tmp, dest)


def obtain_sdist(sdist: Path | None, cache_dir: Path) -> Path:
    if sdist is not None:
        if not sdist.is_file():
            raise InstallError(f"{sdist}: no such file")
        path = sdist
    else:
        path = cache_dir / SDIST_FILE
        if not path.is_file() or sha256_of(path) != SDIST_SHA256:
            download_sdist(path)
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise InstallError(f"{path}: sha256 {digest} does not match the pinned {SDIST_SHA256}")
    return path


def apply_fixes(pkg: Path) -> None:
    for fix in FIXES:
        if fix.regex is not None:
            pattern, repl = fix.regex
            n = 0
            for py in sorted(pkg.rglob("*.py")):
                text = py.read_text()
                new, k = re.subn(pattern, repl, text)
                if k:
                    py.write_text(new)
                    n += k
            if n == 0:
                raise InstallError(f"fix did not apply anywhere: {fix.why}")
            continue
        target = pkg / fix.path
        text = target.read_text()
        for old, new in fix.replacements:
            if text.count(old) != 1:
                raise InstallError(
                    f"fix for {fix.path} expects one {old!r}, found {text.count(old)}"
                )
            text = text.replace(old, new)
        target.write_text(text)
    (pkg / "_compiled_ops.py").write_text(MISSING_OPS_MODULE)
    init = pkg / "__init__.py"
    text = init.read_text()
    if text.count(f'__version__ = "{SDIST_VERSION}"') != 1:
        raise InstallError("detectron2/__init__.py has no version line to stamp")
    init.write_text(text.replace(f'__version__ = "{SDIST_VERSION}"', f'__version__ = "{VERSION}"'))


def _record_line(arcname: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [arcname, f"sha256={digest}", str(len(data))]


def build_wheel(sdist: Path, out_dir: Path) -> Path:
    """Repackage detectron2/ from the sdist as a py3-none-any wheel (PEP 427), fixes applied."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            members = [
                m for m in tar.getmembers() if m.name.startswith(f"{SDIST_NAME}-{SDIST_VERSION}/")
            ]
            # The "data" filter refuses absolute paths and links out of the tree (Python >= 3.10.12).
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kw)
        root = Path(tmp) / f"{SDIST_NAME}-{SDIST_VERSION}"
        pkg = root / "detectron2"
        apply_fixes(pkg)
        license_text = (root / "LICENSE").read_bytes()

        dist_info = f"detectron2-{VERSION}.dist-info"
        metadata = "\n".join(
            [
                "Metadata-Version: 2.1",
                "Name: detectron2",
                f"Version: {VERSION}",
                "Summary: Detectron2 v0.6 (pure-Python build by spine-d2 from pb1-detectron2)",
                "Home-page: https://github.com/facebookresearch/detectron2",
                "License: Apache-2.0",
                "Requires-Python: >=3.8",
                *[f"Requires-Dist: {r}" for r in REQUIRES],
                "",
                "Built by spine-d2's tools/install_detectron2.py with these fixes:",
                *[f"- {f.path}: {f.why}" for f in FIXES],
                "",
            ]
        ).encode()
        wheel_meta = b"Wheel-Version: 1.0\nGenerator: spine-d2 install_detectron2\nRoot-Is-Purelib: true\nTag: py3-none-any\n"

        out_dir.mkdir(parents=True, exist_ok=True)
        wheel = out_dir / f"detectron2-{VERSION}-py3-none-any.whl"
        tmp_wheel = wheel.with_suffix(".whl.part")
        records = []
        with zipfile.ZipFile(tmp_wheel, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(pkg.rglob("*")):
                if f.is_dir() or "__pycache__" in f.parts:
                    continue
                arc = f.relative_to(root).as_posix()
                data = f.read_bytes()
                zf.writestr(arc, data)
                records.append(_record_line(arc, data))
            for name, data in (
                ("METADATA", metadata),
                ("WHEEL", wheel_meta),
                ("LICENSE", license_text),
                ("top_level.txt", b"detectron2\n"),
            ):
                arc = f"{dist_info}/{name}"
                zf.writestr(arc, data)
                records.append(_record_line(arc, data))
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(
                records + [[f"{dist_info}/RECORD", "", ""]]
            )
            zf.writestr(f"{dist_info}/RECORD", buf.getvalue())
        os.replace(tmp_wheel, wheel)
    return wheel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", type=Path, help=f"local {SDIST_FILE} (no network needed)")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spine-d2",
        help="where the downloaded sdist is kept for later offline installs",
    )
    ap.add_argument("-o", "--wheel-dir", type=Path, help="also keep the built wheel here")
    ap.add_argument("--wheel-only", action="store_true", help="build the wheel, do not install")
    ap.add_argument("--force", action="store_true", help="rebuild and reinstall even if present")
    args = ap.parse_args(argv)

    try:
        if not args.wheel_only and not args.force:
            version, has_ops = installed_detectron2()
            if has_ops:
                log(f"detectron2 {version} with compiled ops is already installed; keeping it")
                return 0
            if version == VERSION:
                log(f"detectron2 {VERSION} is already installed")
                return 0
        sdist = obtain_sdist(args.sdist, args.cache_dir)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = build_wheel(sdist, args.wheel_dir or Path(tmp))
            log(f"built {wheel.name}")
            if args.wheel_only:
                return 0
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--force-reinstall",
                "--no-deps",
                str(wheel),
            ]
            # Dependencies go through a normal resolve (so already-satisfied ones stay put);
            # the wheel itself is force-reinstalled so that a rebuilt BUILD replaces the old one.
            subprocess.run([sys.executable, "-m", "pip", "install", *REQUIRES], check=True)
            subprocess.run(cmd, check=True)
        version, _ = installed_detectron2()
        if version != VERSION:
            raise InstallError(
                f"installed detectron2 reports version {version}, expected {VERSION}"
            )
        log(f"installed detectron2 {VERSION}")
        return 0
    except (InstallError, subprocess.CalledProcessError) as e:
        print(f"install_detectron2: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""spine-d2: vertebra instance segmentation and per-vertebra ZOI enhancement on Detectron2.

detectron2 itself is not on PyPI: `make install` (or `python tools/install_detectron2.py`)
installs it before this package. It is checked at import time rather than declared here,
so that pip never resolves the name "detectron2" against a public index.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="spine-d2",
    version="0.1.0",
    description="Vertebra detection/segmentation in X-ray (Mask R-CNN, Detectron2) and ZOI export",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["spine_d2", "spine_d2.*"]),
    # Ranges are the ones tested (torch 2.14.1 / torchvision 0.29.1 / numpy 2.4 / opencv 5.0).
    install_requires=[
        "torch>=2.1,<2.15",
        "torchvision>=0.16,<0.30",
        "numpy>=1.23,<3",
        "opencv-python-headless>=4.8,<6",
        "pycocotools>=2.0.7,<3",
        "Pillow>=10",
        "tifffile>=2023.1",
        "pyyaml>=6,<7",
        "tqdm>=4.60,<5",
        "tensorboard>=2.10,<3",
        "matplotlib>=3.5",  # report figures (detectron2 needs it too)
    ],
    extras_require={
        "dicom": ["pydicom>=3.0,<4"],
        # DRR rendering of the built-in dataset. diffdrr itself is installed with --no-deps by
        # `make install`: its declared pyvista[all], timm, kornia... are not needed to render.
        "drr": [
            "torchio>=0.20",
            "nibabel>=5",
            "pandas>=2",
            "einops>=0.7",
            "fastcore>=1.5",
            "scipy>=1.10",
        ],
        "dev": ["pytest>=7,<10", "pytest-xdist>=3,<4", "pydicom>=3.0,<4", "black", "isort"],
    },
)

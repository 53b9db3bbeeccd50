#!/usr/bin/env python
"""`make demo`: data -> fine-tune -> evaluate -> export ZOIs -> enhance -> report (see spine_d2.demo)."""

from spine_d2.demo import main
from spine_d2.errors import run_cli

if __name__ == "__main__":
    run_cli(main, "demo")

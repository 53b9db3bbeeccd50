#!/usr/bin/env python
"""`make demo`: data -> fine-tune -> evaluate -> export ZOIs -> enhance -> report (see spine_d2.demo)."""

import sys

from spine_d2.demo import main

if __name__ == "__main__":
    sys.exit(main())

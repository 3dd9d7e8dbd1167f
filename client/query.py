#!/usr/bin/env python
"""Find the catalogue items most similar to a photo: ``mildnet query`` for a checkout (see mildnet/query.py).

    python client/query.py img.jpg [--k 10] [--filter category=Apple] [--json] [--html out.html] [--png out.png]
"""
import sys
from pathlib import Path

try:
    import mildnet  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mildnet.query import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="query.py"))

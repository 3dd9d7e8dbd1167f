#!/usr/bin/env python
"""Build or update a catalogue index through Triton: ``mildnet index`` for a checkout (see mildnet/index/cli.py).

    python client/index.py CATALOGUE --out catalogue.mindex [--url localhost:8000 --url host2:8000]
"""
import sys
from pathlib import Path

try:
    import mildnet  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mildnet.index.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="index.py"))

#!/usr/bin/env python
"""Build or update a catalogue index through Triton: ``mildnet index`` (see mildnet/index/cli.py).

    python client/index.py CATALOGUE --out catalogue.mindex [--url localhost:8000 --url host2:8000]
"""
import sys

from mildnet.index.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="index.py"))

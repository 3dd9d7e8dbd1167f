#!/usr/bin/env python
"""``make demo``: MILDNet visual search end to end on real data, through the project's own commands (the
stages and flags: ``python client/demo.py --help``, and mildnet/demo.py).

    python client/demo.py                                   # what `make demo` runs
    python client/demo.py --slice 4 --queries 4 --epochs 1 --input-size 64 --locust-seconds 5   # a quick one
"""
import sys
from pathlib import Path

from mildnet.demo import Checkout, main

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = Checkout(root=ROOT, locustfile=ROOT / "client" / "locustfile.py",
                    work=ROOT / "work" / "demo", grocery=ROOT.parent / "shared" / "data" / "grocery",
                    record=ROOT / "bench" / "results" / "demo.json",
                    picture=ROOT / "docs" / "img" / "demo_query.png")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], CHECKOUT))

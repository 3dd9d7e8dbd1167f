#!/usr/bin/env python
"""Find the catalogue items most similar to a photo: ``mildnet query`` (see mildnet/commands/query.py).

    python client/query.py img.jpg [--k 10] [--filter category=Apple] [--json] [--html out.html] [--png out.png]
"""
import sys

from mildnet.commands.query import main

if __name__ == "__main__":
    sys.exit(main(prog="query.py"))

"""The ``mildnet`` command: thin. Each subcommand is one module (in its room, or in :mod:`mildnet.commands` for
the flat ones) exposing ``configure_parser(parser)`` and ``run(args) -> int``; this file only wires them up."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MildnetError

# name -> (module, one-line help). Imported lazily so one broken room never hides the others.
COMMANDS: dict[str, tuple[str, str]] = {
    "weights": ("mildnet.weights.cli", "fetch and convert pretrained backbones (offline sources)"),
    "models": ("mildnet.models.cli", "list the model zoo"),
    "triplets": ("mildnet.commands.triplets", "create a triplet CSV from a catalogue"),
    "train": ("mildnet.commands.train", "train a MILDNet model on triplets"),
    "eval": ("mildnet.commands.evaluate", "triplet accuracy, retrieval metrics and a results page"),
    "export": ("mildnet.commands.export", "export a checkpoint into a Triton model repository"),
    "serve": ("mildnet.commands.serve", "start Triton Inference Server on a model repository"),
    "index": ("mildnet.index.cli", "build or update a catalogue index through a running server"),
    "query": ("mildnet.commands.query", "the catalogue items most similar to a photo, through a running server"),
    "ui": ("mildnet.ui.cli", "the search page (a web app) in front of a running Triton server"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mildnet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:  # only import the room that runs
            importlib.import_module(module).configure_parser(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MildnetError, FileNotFoundError) as e:
        # A problem we detected (or a path the user named that is not there): one line names it. Anything else
        # (a RuntimeError from torch, MemoryError, a bug) raises with its traceback: that is what gets reported.
        print(f"mildnet {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

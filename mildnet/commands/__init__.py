"""The ``mildnet`` subcommands whose library is one flat module (train, eval, triplets, query, export, serve):
one module each, ``configure_parser(parser)`` + ``run(args) -> int``, wired up by :mod:`mildnet.cli`. The
subcommands of a room package live in it (``mildnet.index.cli``, ``models.cli``, ``weights.cli``, ``ui.cli``)."""

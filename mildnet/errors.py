"""The base of every error mildnet raises on purpose.

The CLI prints a :class:`MildnetError` as one line (the message names the problem) and lets anything else (a
torch bug, out of memory) raise with its traceback. Each room keeps its own subclasses next to the code that
raises them; they derive from this base as well as from the builtin that callers already catch.
"""


class MildnetError(Exception):
    """A problem with the user's input, files or servers that mildnet detected and can explain in one line."""


class UsageError(MildnetError, ValueError):
    """A command-line argument or setting that cannot work; the message names it (argparse checks each flag
    alone, this is for the rules between flags and the checks a library function makes of its arguments)."""

"""`import mildnet` registers the op; every project error derives from MildnetError; the CLI prints those in one
line and lets anything else (a torch bug, out of memory) raise with its traceback."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mildnet
from mildnet.cli import main
from mildnet.errors import MildnetError

ROOT = Path(__file__).resolve().parents[1]

# Triton's Python-model shell imports triton_python_backend_utils, which exists only inside tritonserver.
NOT_IMPORTABLE_HERE = ("mildnet.serving.templates.",)


def project_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(mildnet.__path__, "mildnet.")]
    return sorted(n for n in names if not n.startswith(NOT_IMPORTABLE_HERE) and n != "mildnet.__main__")


def project_exceptions() -> list[tuple[str, type]]:
    """Every exception class defined (not just imported) in a module of the package."""
    found = []
    for name in project_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                found.append((f"{name}.{cls.__qualname__}", cls))
    return found


EXCEPTIONS = project_exceptions()


def test_the_walk_finds_the_known_errors():
    names = {n for n, _ in EXCEPTIONS}
    assert {"mildnet.checkpoint.CheckpointError", "mildnet.index.base.IndexFileError",
            "mildnet.data.catalogue.CatalogueError", "mildnet.errors.UsageError"} <= names, sorted(names)


@pytest.mark.parametrize("name,cls", EXCEPTIONS, ids=[n for n, _ in EXCEPTIONS])
def test_every_project_error_derives_from_mildnet_error(name, cls):
    assert issubclass(cls, MildnetError), f"{name} bases: {[b.__name__ for b in cls.__mro__]}"


@pytest.mark.parametrize("name,builtin", [
    ("mildnet.checkpoint.CheckpointError", ValueError), ("mildnet.errors.UsageError", ValueError),
    ("mildnet.weights.cache.WeightsError", RuntimeError), ("mildnet.ui.files.NotInCatalogue", LookupError)])
def test_errors_keep_their_builtin_base(name, builtin):
    """`except ValueError` callers keep working."""
    assert issubclass(dict(EXCEPTIONS)[name], builtin)


def test_import_mildnet_registers_the_op_and_nothing_optional():
    code = ("import sys, mildnet, torch\n"
            "op = torch.ops.mildnet.gap_concat\n"
            "x = [torch.ones(2, 3, 4, 4), torch.full((2, 5, 2, 2), 2.0)]\n"
            "assert torch.equal(op(x, False, 1e-12), torch.cat([torch.ones(2, 3), torch.full((2, 5), 2.0)], 1))\n"
            "heavy = sorted(m for m in ('tritonclient', 'faiss', 'pymilvus', 'starlette', 'matplotlib', "
            "'mildnet.models', 'mildnet.train') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_cli_prints_a_project_error_in_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,item_id\n")
    r = subprocess.run([sys.executable, "-m", "mildnet", "triplets", str(bad), "--out", str(tmp_path / "t")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("mildnet triplets: error: ") and "bad.csv" in lines[0], r.stderr


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), MemoryError(),
                                   ValueError("a bug, not a user error"), KeyError("x")])
def test_cli_lets_other_errors_raise(error, monkeypatch):
    import mildnet.models.cli

    def broken(args):
        raise error

    monkeypatch.setattr(mildnet.models.cli, "run", broken)
    with pytest.raises(type(error)):
        main(["models"])


@pytest.mark.parametrize("error", [MildnetError("the thing named here is wrong"),
                                   FileNotFoundError("the thing named here is wrong")])  # a path the user gave
def test_cli_one_line_for_a_mildnet_error(error, monkeypatch, capsys):
    import mildnet.models.cli

    def refuse(args):
        raise error

    monkeypatch.setattr(mildnet.models.cli, "run", refuse)
    assert main(["models"]) == 1
    assert capsys.readouterr().err == "mildnet models: error: the thing named here is wrong\n"

"""Packaging (issue 18): pyproject.toml's declared dependencies agree with requirements.txt's pins; a build that
cannot see torch stops early and says what to type; the wheel, installed into a fresh virtualenv outside the
checkout, exports, serves, indexes and queries with its console scripts.

The fresh virtualenv is offline and fast: instead of downloading gigabytes, it receives (as symlinks, file by
file) exactly the distributions that the wheel's own metadata declares, followed transitively, taken from the
environment `make` installed. Nothing else is there (no --system-site-packages): a dependency missing from
pyproject.toml is missing there too, so an import fails, and `pip install --no-index` of the wheel must find
every declared requirement already satisfied.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
WHEEL_EXTRAS = ("serve", "index")  # what the journey below needs: export, serve, index, query


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def declared() -> dict[str, list[tuple[str, Requirement]]]:
    """canonical name -> [(where, requirement)] over the dependencies and every extra (self-references skipped)."""
    out: dict[str, list[tuple[str, Requirement]]] = {}
    groups = {"dependencies": PYPROJECT["project"]["dependencies"], **PYPROJECT["project"]["optional-dependencies"]}
    for where, reqs in groups.items():
        for text in reqs:
            req = Requirement(text)
            if canonicalize_name(req.name) != "mildnet":
                out.setdefault(canonicalize_name(req.name), []).append((where, req))
    return out


PINS = requirement_lines(ROOT / "requirements.txt")


@pytest.mark.parametrize("line", PINS)
def test_every_pin_satisfies_its_declared_range(line):
    """requirements.txt (what `make` installs) against pyproject.toml (what a pip user gets): the package is
    declared, the pinned version (or, for a range pin, the version `make` installed) lies in the declared
    range, and the pin's extras are declared extras."""
    pin = Requirement(line)
    name = canonicalize_name(pin.name)
    decls = declared().get(name)
    assert decls, f"requirements.txt pins {pin.name} but pyproject.toml declares it nowhere"
    exact = [s.version for s in pin.specifier if s.operator == "=="]
    version = exact[0] if exact else metadata.version(pin.name)
    assert pin.specifier.contains(version, prereleases=True), f"installed {pin.name} {version} breaks pin {line!r}"
    for where, req in decls:
        assert req.specifier.contains(version, prereleases=True), (
            f"{pin.name} {version} (requirements.txt: {line!r}) is outside pyproject.toml's {where}: {req}")
        assert pin.extras <= req.extras, f"{line!r} asks for extras {pin.extras - req.extras} that {where} lacks"


def test_all_extra_holds_every_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    (all_req,) = [Requirement(r) for r in extras["all"]]
    assert all_req.name == "mildnet" and all_req.extras | {"client"} == set(extras) - {"all"}
    assert "mildnet[client]" in extras["serve"]  # the client extra comes with serve


def test_build_requirement_has_no_torch_and_the_runtime_range_is_declared_once():
    """The extension is built against the installed torch (no isolated build with some other torch)."""
    build_reqs = [canonicalize_name(Requirement(r).name) for r in PYPROJECT["build-system"]["requires"]]
    assert "torch" not in build_reqs
    assert [str(r) for _, r in declared()["torch"]] == ["torch<2.15,>=2.14"]


def test_extension_records_the_torch_it_was_built_against():
    import torch

    from mildnet import _build_info, ops

    assert _build_info.TORCH_VERSION == torch.__version__
    assert ops.EXTENSION_LOADED, ops.EXTENSION_ERROR


def test_extension_built_against_another_torch_is_refused():
    """A stale extension (torch upgraded since the build) is not loaded: the reference path runs, with a warning
    that says how to rebuild, instead of a crash or garbage from a C++ ABI mismatch."""
    # `import mildnet` loads the op, so the stale build record is in place before the package is imported.
    code = ("import sys, types; b = types.ModuleType('mildnet._build_info'); b.TORCH_VERSION = '1.0.0'; "
            "sys.modules[b.__name__] = b; import mildnet.ops as o; print(o.EXTENSION_LOADED, o.EXTENSION_ERROR)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False mildnet._C was compiled against torch 1.0.0")
    assert "pip install --no-build-isolation -e ." in r.stdout


# ---- the slow part: isolated build refused; wheel -> fresh venv -> export, serve, index, query ----------------
def _pip_env(**extra: str) -> dict[str, str]:
    """pip with no configuration file, no extra index or find-links: what a stranger's pip would see offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH",)}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


@pytest.mark.slow
def test_plain_isolated_build_stops_early_saying_what_to_type(tmp_path):
    """`pip wheel .` with build isolation (what a plain `pip install -e .` does): the isolated environment has no
    torch, so setup.py stops before compiling anything and names the command to use."""
    t0 = time.monotonic()
    # pip's own configuration stays: the isolated environment fetches setuptools and wheel as usual.
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "cannot see torch" in out and "pip install --no-build-isolation -e" in out, out[-3000:]
    assert "mildnet: building" not in out  # stopped before compiling anything
    assert not list(tmp_path.glob("*.whl"))
    assert time.monotonic() - t0 < 300


def requirement_closure(requirements: list[Requirement], extras: set[str]) -> list[metadata.Distribution]:
    """The installed distributions a set of requirements pulls in, transitively, markers evaluated."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [(req, extras) for req in requirements]
    while todo:
        req, wanted = todo.pop()
        env = default_environment()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in wanted | {""}):
            continue
        name = canonicalize_name(req.name)
        if name == "mildnet":  # a self-reference such as mildnet[client]
            todo += [(r, set(req.extras)) for r in requirements]
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req} is declared (wheel metadata) but `make` did not install it: add it to requirements.txt")
        assert req.specifier.contains(dist.version, prereleases=True), f"installed {name} {dist.version} breaks {req}"
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen[key] = dist
        todo += [(Requirement(r), set(req.extras)) for r in (dist.requires or [])]
    unique = {canonicalize_name(d.metadata["Name"]): d for d in seen.values()}
    return list(unique.values())


def link_distribution(dist: metadata.Distribution, site: Path) -> int:
    """Symlink one installed distribution's files (its RECORD) into another site-packages."""
    n = 0
    base = Path(dist.locate_file(""))
    for f in dist.files or []:
        rel = Path(f)
        if rel.parts[0] == ".." or rel.suffix == ".pyc":  # scripts in bin/ and byte code are not needed
            continue
        src, dst = base / rel, site / rel
        if not src.exists() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
        n += 1
    return n


def run_ok(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`python -m build --no-isolation`: an sdist, and the wheel built from that sdist (outside the checkout).
    CPU-only extension (MILDNET_NO_CUDA=1) to keep the compile short; the CUDA build is `make build`'s."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "MILDNET_NO_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    run_ok([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], env=env, timeout=900)
    (sdist,), (whl,) = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"kernels/gap_concat.h", "kernels/cuda/gap_concat_cuda.cu", "setup.py", "pyproject.toml",
            "mildnet/serving/templates/model.py"} <= names
    return whl


@pytest.mark.slow
@pytest.mark.server
def test_wheel_in_a_fresh_venv_exports_serves_indexes_and_queries(wheel, tmp_path, grocery_photos):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {f"mildnet/serving/templates/{t}" for t in ("model.py", "embedding.pbtxt", "preprocess.pbtxt",
                                                        "ensemble.pbtxt", "similar.pbtxt")} <= names
    assert any(re.fullmatch(r"mildnet/_C\.cpython-.*\.so", n) for n in names)
    assert not any(n.startswith(("client/", "tests/", "model_repository/")) for n in names)

    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    run_ok([sys.executable, "-m", "venv", venv], timeout=300)  # with its own pip (ensurepip: offline)
    py = venv / "bin" / "python"
    site = Path(run_ok([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    declared_reqs = [Requirement(v.strip()) for k, v in
                     (line.split(":", 1) for line in meta.splitlines() if ":" in line) if k == "Requires-Dist"]
    dists = requirement_closure(declared_reqs, set(WHEEL_EXTRAS))
    assert {"torch", "nvidia-pytriton", "faiss-cpu", "tritonclient", "pillow"} <= {
        canonicalize_name(d.metadata["Name"]) for d in dists}
    assert sum(link_distribution(d, site) for d in dists) > 1000

    # pip itself checks that the declared requirements are all met, with no index to fetch anything from.
    extras = ",".join(WHEEL_EXTRAS)
    run_ok([py, "-m", "pip", "install", "--no-index", f"mildnet[{extras}] @ {wheel.as_uri()}"],
           env=_pip_env(), cwd=work, timeout=600)
    run_ok([py, "-m", "pip", "check"], env=_pip_env(), cwd=work, timeout=120)
    probe = run_ok([py, "-c", "import mildnet, mildnet.ops as o; print(mildnet.__file__); print(o.EXTENSION_LOADED)"
                    "; import importlib.util as u; print(u.find_spec('pytest') is None)"], cwd=work, timeout=300)
    where, loaded, no_pytest = probe.stdout.split()
    assert Path(where).is_relative_to(site) and loaded == "True" and no_pytest == "True"  # isolated from .venv

    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MILDNET_TRITON_DIR")}
    run_ok([bin_ / "mildnet", "export", "--untrained", "mildnet_mobile", "--input-size", "96", "--max-batch-size",
            "8", "--repository", "repo"], cwd=work, env=env, timeout=600)
    assert (work / "repo" / "similar" / "1" / "model.py").is_file()
    server = subprocess.Popen([bin_ / "mildnet", "serve", "--repository", "repo", "--http-port", "0", "--grpc-port",
                               "0", "--metrics-port", "0", "--poll-secs", "0", "--timeout", "400"],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    # a server that comes up but never prints the expected line must not hang the suite: kill it after 10 min
    watchdog = threading.Timer(600, lambda: os.killpg(server.pid, signal.SIGKILL))
    watchdog.start()
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if "SIGTERM stops it" in line:  # the last line of the ready message
                break
        watchdog.cancel()
        url = re.search(r"http://(127\.0\.0\.1:\d+)", "".join(lines))
        assert url, "mildnet serve did not come up:\n" + "".join(lines)[-4000:]
        url = url.group(1)
        log = next(line.split()[-1] for line in lines if line.split()[:1] == ["log"])
        assert Path(log).is_relative_to(venv)  # the assembled backend and logs live in the venv, not a checkout

        photos = tmp_path / "photos"  # a folder-per-class catalogue: ids are paths under it
        (photos / "shelf").mkdir(parents=True)
        for p in grocery_photos[:6]:
            shutil.copy(p, photos / "shelf" / p.name)
        index_file = work / "repo" / "similar" / "index" / "catalogue.mindex"
        run_ok([bin_ / "mildnet", "index", photos, "--out", index_file, "--url", url, "--no-progress"],
               cwd=work, env=env, timeout=600)
        query = grocery_photos[2]
        # `similar` loads the index file on the first request after it appears. The checkout's client script,
        # run by the venv's Python, uses the installed mildnet (the README's manual path).
        for cmd in ([bin_ / "mildnet", "query", query, "--k", "3", "--json", "--url", url],
                    [py, ROOT / "client" / "query.py", query, "--k", "3", "--json", "--url", url]):
            hits = json.loads(run_ok(cmd, cwd=work, env=env, timeout=300).stdout)["hits"]
            assert len(hits) == 3 and hits[0]["id"] == f"shelf/{query.name}" and hits[0]["score"] > 0.99, hits
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

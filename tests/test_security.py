"""Secure defaults: loopback-only servers, a maximum request size, no pickle of untrusted data anywhere in the
tree, and checkpoints / index files verified before use (a file we did not write is refused, clearly)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mildnet.checkpoint import CheckpointError, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["mildnet", "client", "bench", "tests", "setup.py"]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- servers bind 127.0.0.1 unless told otherwise ---------------------------------------------------------------------
def test_server_command_binds_loopback_by_default(tmp_path):
    from mildnet.serving.server import TritonServer, find_tritonserver

    server = TritonServer(tmp_path)
    server.installation, server.ports = find_tritonserver(), {"http": 1, "grpc": 2, "metrics": 3}
    cmd = server.command()
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in cmd
    exposed = TritonServer(tmp_path, host="0.0.0.0")  # only when asked
    exposed.installation, exposed.ports = server.installation, server.ports
    assert "--http-address=0.0.0.0" in exposed.command()


def test_serve_cli_default_host_is_loopback():
    import argparse

    from mildnet.commands.serve import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args([]).host == "127.0.0.1"


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            if width == 32 and addr_hex.startswith("0000000000000000FFFF0000"):  # IPv4-mapped ::ffff:a.b.c.d
                addr_hex, width = addr_hex[24:], 8
            if width == 8:
                addr = ".".join(str(b) for b in bytes.fromhex(addr_hex)[::-1])
            else:
                addr = "::1" if addr_hex == "0" * 24 + "01000000" else ("::" if set(addr_hex) == {"0"} else addr_hex)
            out.add((addr, int(port_hex, 16)))
    return out


@pytest.mark.server
def test_running_server_listens_on_loopback_only(triton_server):
    sockets = listening_sockets(triton_server.process.pid)
    ports = {triton_server.ports[k] for k in ("http", "grpc", "metrics")}
    assert {port for _, port in sockets} >= ports
    exposed = [(a, p) for a, p in sockets if a not in ("127.0.0.1", "::1")]
    assert not exposed, f"tritonserver listens beyond loopback: {exposed}"


# -- a maximum request size -------------------------------------------------------------------------------------------
def test_query_script_refuses_oversized_file(tmp_path):
    """A file over imageio.MAX_BYTES is refused with the limit named (a sparse file: no disk used)."""
    from mildnet.imageio import MAX_BYTES
    from mildnet.serving.server import free_port

    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(MAX_BYTES + 1)
    r = run_cli("client/query.py", str(big), "--url", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and f"more than the {MAX_BYTES} allowed" in r.stderr, r.stderr


def test_triton_request_size_flag_is_used_where_it_exists(tmp_path):
    """Triton >= 2.55 caps HTTP request bodies (--http-max-input-size); 2.51 from the pytriton wheel has no such
    flag, so the cap there is imageio.MAX_BYTES per image (tests/test_bad_input.py::test_image_over_max_bytes_refused)
    and the PIXELS shape check of `mildnet`. When the flag exists, TritonServer must pass it."""
    from mildnet.serving.server import TritonServer, _server_env, find_tritonserver

    inst = find_tritonserver()
    help_text = subprocess.run([str(inst.binary), "--help"], capture_output=True, text=True, timeout=60,
                               env=_server_env(inst)).stdout
    if "--http-max-input-size" not in help_text:
        pytest.skip("this tritonserver has no --http-max-input-size (Triton < 2.55); the cap is imageio.MAX_BYTES")
    server = TritonServer(tmp_path)
    server.installation, server.ports = inst, {"http": 1, "grpc": 2, "metrics": 3}
    assert any(a.startswith("--http-max-input-size=") for a in server.command())


# -- no pickle of untrusted data --------------------------------------------------------------------------------------
UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"), ("cPickle", "loads"),
    ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("shelve", "open"), ("pd", "read_pickle"),
    ("pandas", "read_pickle"), ("yaml", "load"), ("yaml", "unsafe_load"), ("marshal", "loads"),
}


def unsafe_loads(path: Path) -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle & co, np.load with
    allow_pickle=True."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None,
                f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None))
        kw = {k.arg: k.value for k in node.keywords}
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}"
        if name[1] == "load" and name[0] == "torch":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif name in UNSAFE_CALLS or (name[0] is None and name[1] in ("Unpickler",)):
            found.append(f"{where}: {name[0]}.{name[1]}")
        elif name[1] == "load" and name[0] in ("np", "numpy"):
            ap = kw.get("allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                found.append(f"{where}: np.load(allow_pickle=True)")
    return found


def python_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        p = ROOT / entry
        files += [p] if p.is_file() else sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
    return files


def test_no_pickle_of_untrusted_data_in_the_tree():
    files = python_files()
    assert len(files) > 20 and any(f.name == "checkpoint.py" for f in files)
    found = [hit for f in files for hit in unsafe_loads(f)]
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)


def test_the_scanner_catches_what_it_should(tmp_path):
    """The scanner itself: each unsafe pattern is reported, safe forms are not."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch, numpy as np, pickle, yaml\n"
                     "torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\n"
                     "pickle.loads(b)\nnp.load(p, allow_pickle=True)\nnp.load(p)\nyaml.load(s)\nyaml.safe_load(s)\n")
    found = unsafe_loads(probe)
    assert [h.split(": ", 1)[1] for h in found] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "pickle.loads",
        "np.load(allow_pickle=True)", "yaml.load"]


class _RunsCode:
    """Pickles into "call os.mkdir(marker)": what a booby-trapped checkpoint would do on a plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "mildnet-checkpoint", "format_version": 1, "variant": "mildnet_mobile",
                "state_dict": {}, "payload": _RunsCode(marker)}, path)
    return path, marker


def test_booby_trapped_checkpoint_is_refused_not_run(evil_checkpoint):
    from mildnet import models

    path, marker = evil_checkpoint
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        models.load_checkpoint(path)
    assert not marker.exists()


def test_booby_trapped_checkpoint_refused_by_export_cli(evil_checkpoint, tmp_path):
    path, marker = evil_checkpoint
    r = run_cli("-m", "mildnet", "export", "--checkpoint", str(path), "--repository", str(tmp_path / "repo"))
    assert r.returncode == 1 and "not a loadable checkpoint" in r.stderr, r.stderr
    assert not marker.exists()


def test_index_file_metadata_is_plain_json(tmp_path):
    """An index file's metadata is JSON behind a fixed binary prefix: readable without running anything."""
    import json
    import struct

    from mildnet.index import create_index

    index = create_index(8, kind="flat", model_version="m")
    index.add(["a"], np.eye(8, dtype=np.float32)[:1], [{"category": "<b>x</b>", "price": 1.5}])
    index.save(tmp_path / "a.mindex")
    data = (tmp_path / "a.mindex").read_bytes()
    magic, _, h, _, _, _ = struct.unpack("<8sIQQQ32s", data[:68])
    header = json.loads(data[68:68 + h])
    assert magic == b"MILDIDX\n" and header["metadata"] == [{"category": "<b>x</b>", "price": 1.5}]


# -- checkpoints and index files verified before use ------------------------------------------------------------------
def test_checkpoint_without_header_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a mildnet checkpoint"):
        read_checkpoint(path)
    torch.save({"format": "mildnet-checkpoint", "format_version": 99, "variant": "x"}, path)
    with pytest.raises(CheckpointError, match="newer than this mildnet understands"):
        read_checkpoint(path)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    from mildnet import models
    from mildnet.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = models.create("mildnet_mobile", pretrained=False, input_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, model, variant=model.variant, model_kwargs=model.model_kwargs)
    return path


def test_truncated_checkpoint_refused(small_checkpoint, tmp_path):
    data = small_checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        read_checkpoint(cut)


def test_bit_flip_in_checkpoint_weights_detected(small_checkpoint, tmp_path):
    """A checkpoint records the sha256 of its weights: one flipped byte inside a tensor is refused by name."""
    data = bytearray(small_checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data of the zip archive
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.pt: weights do not match their sha256"):
        read_checkpoint(flipped)
    read_checkpoint(small_checkpoint)  # the intact file passes the same check


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[: len(d) - 100], "truncated index file"),
    (lambda d: d[:200] + bytes([d[200] ^ 0xFF]) + d[201:], "checksum mismatch"),
    (lambda d: b"PK\x03\x04" + d[4:], "not a mildnet index file"),
])
def test_query_script_refuses_damaged_index(tmp_path, grocery_photos, damage, message):
    from mildnet.index import create_index
    from mildnet.serving.server import free_port

    index = create_index(8, kind="flat", model_version="m")
    index.add([f"i{n}" for n in range(4)], np.eye(8, dtype=np.float32)[:4], [{"n": n} for n in range(4)])
    index.save(tmp_path / "good.mindex")
    (tmp_path / "bad.mindex").write_bytes(damage((tmp_path / "good.mindex").read_bytes()))
    r = run_cli("client/query.py", str(grocery_photos[0]), "--index", str(tmp_path / "bad.mindex"),
                "--url", f"127.0.0.1:{free_port()}")
    assert r.returncode in (1, 3) and message in r.stderr, r.stderr  # refused before or without the server


@pytest.mark.server
def test_served_index_damaged_then_restored(triton_server, catalogue_index, grocery_photos, tmp_path):
    """The `similar` model verifies the index it reloads: a damaged file gets a clear error per query (never
    served, the server stays up, embeddings still answer); the repaired file is served again. The error names
    the file, not the server's path, and never echoes the file's bytes (the issue: `bad magic b'root:x:0'` for a
    symlink to /etc/passwd). It is the server's problem, not the request's: HTTP 500 / gRPC INTERNAL, and
    query.py exits 3."""
    from mildnet.serving.client import ServerSideError, TritonEmbedder

    path, ids, _ = catalogue_index
    original = path.read_bytes()
    photo = grocery_photos[0].read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    secret = tmp_path / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 8)
    try:
        for what, install, message in [
                ("bit flip", lambda tmp: tmp.write_bytes(bytes(damaged)), "checksum mismatch"),
                ("symlink to another file", lambda tmp: tmp.symlink_to(secret), "not a mildnet index file")]:
            tmp = path.with_name(".damaged.tmp")
            install(tmp)
            os.replace(tmp, path)
            for url, protocol in ((triton_server.http_url, "http"), (triton_server.grpc_url, "grpc")):
                with TritonEmbedder(url, protocol) as remote:
                    with pytest.raises(ServerSideError, match=message) as e:
                        remote.similar(photo, k=2)
                    text = str(e.value)
                    assert path.name in text and str(path.parent) not in text, text
                    assert "root:x" not in text and str(tmp_path) not in text, text
                    assert remote.embed([photo]).shape[0] == 1
            r = run_cli("client/query.py", str(grocery_photos[0]), "--url", triton_server.http_url)
            assert r.returncode == 3 and message in r.stderr and "server problem" in r.stderr, (what, r.stderr)
    finally:
        tmp = path.with_name(".restore.tmp")
        tmp.write_bytes(original)
        os.replace(tmp, path)
    with TritonEmbedder(triton_server.grpc_url, "grpc") as remote:
        assert remote.similar(photo, k=1)[0].id == ids[0]

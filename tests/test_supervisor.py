"""`mildnet serve` supervises tritonserver: a crash (SIGKILL, the form-encoded-body SIGSEGV of Triton 2.51) is
logged, the dead server's /dev/shm regions removed and the server started again on the same ports, with the same
answers; the shared-memory API, a second one-request crash, is behind a key. The supervision loop itself is also
tested without Triton, on a stand-in server."""
from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mildnet.serving.server import (ADMIN_KEY_HEADER, RESTRICTED_APIS, CpuSetError, TritonServer, free_port,
                                    parse_cpus, remove_shm_regions, signal_name, supervise)

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


# -- without Triton ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code,words", [(-9, "killed by SIGKILL"), (-11, "killed by SIGSEGV"), (1, "exit code 1"),
                                        (0, "exit code 0"), (None, "still running")])
def test_signal_name(code, words):
    assert signal_name(code) == words


def test_remove_shm_regions_touches_only_its_prefix(tmp_path):
    for name in ("mildnet_1_ab_region1", "mildnet_1_ab_region2", "mildnet_1_cd_region1", "other"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_shm_regions("mildnet_1_ab_", tmp_path) == ["mildnet_1_ab_region1", "mildnet_1_ab_region2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mildnet_1_cd_region1", "other"]
    for bad in ("", "../x", "a/b"):
        with pytest.raises(ValueError):
            remove_shm_regions(bad, tmp_path)


def test_each_server_has_its_own_shm_prefix_and_restricted_apis(tmp_path):
    a, b = TritonServer(tmp_path), TritonServer(tmp_path)
    assert a.shm_prefix != b.shm_prefix and a.admin_key != b.admin_key
    a.installation = b.installation = type("I", (), {"binary": Path("tritonserver"), "backend_dir": None})()
    a.ports = {"http": 1, "grpc": 2, "metrics": 3}
    cmd = a.command()
    assert f"--backend-config=python,shm-region-prefix-name={a.shm_prefix}" in cmd
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        assert f"{flag}={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={a.admin_key}" in cmd


class StandIn:
    """What supervise() uses of a TritonServer, around a `sleep` process: crash it, count restarts."""

    def __init__(self, fail_restarts: int = 0):
        self.process = subprocess.Popen(["sleep", "300"])
        self.restarts, self.stops, self.fail_restarts = 0, 0, fail_restarts

    def log_tail(self, lines=10):
        return "(log)"

    def stop(self):
        self.stops += 1
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self, timeout):
        from mildnet.serving.server import ServerStartError

        self.stop()
        self.restarts += 1
        if self.restarts <= self.fail_restarts:
            raise ServerStartError("port in use")
        self.process = subprocess.Popen(["sleep", "300"])


@pytest.mark.parametrize("text,want", [("0", {0}), ("0-0", {0}), (" 0 ,0", {0})])
def test_parse_cpus(text, want):
    assert parse_cpus(text) == want


@pytest.mark.parametrize("text,message", [("a", "cannot read"), ("1-0", "backwards"), ("4096", "not available"),
                                          ("", "cannot read")])
def test_parse_cpus_errors(text, message):
    with pytest.raises(CpuSetError, match=message):
        parse_cpus(text)


def test_serve_cpus_flag_refuses_a_core_it_cannot_use(capsys):
    from mildnet.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--cpus", "4096"])
    assert exit_info.value.code == 2 and "not available here" in capsys.readouterr().err


def test_supervise_restarts_with_backoff_until_stopped():
    server, stop, events = StandIn(fail_restarts=2), threading.Event(), []
    thread = threading.Thread(target=supervise, args=(server, stop),
                              kwargs=dict(on_event=events.append, backoff=(0.1, 0.3, 0.6), poll_secs=0.05))
    thread.start()
    try:
        server.process.send_signal(signal.SIGSEGV)
        deadline = time.monotonic() + 10
        while not any(e.kind == "restarted" for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        kinds = [e.kind for e in events]
        assert kinds == ["died", "restarting", "restart_failed", "restarting", "restart_failed", "restarting",
                         "restarted"], kinds
        assert "killed by SIGSEGV" in events[0].message
        waits = [float(e.message.split(" in ")[1].split(" s")[0]) for e in events if e.kind == "restarting"]
        assert waits == sorted(waits)  # back-off grows (printed rounded)
        assert server.process.poll() is None and server.restarts == 3
    finally:
        stop.set()
        thread.join(10)
        server.stop()
    assert not thread.is_alive()


# -- a real `mildnet serve` ----------------------------------------------------------------------------------------
def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:  # closed each time: an open connection makes Triton wait out its exit timeout at SIGTERM
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def _triton_pid(serve_pid: int) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == serve_pid and b"tritonserver" in cmd and fields[0] != "Z":
                return int(entry)
    return None


def _shm_prefix(triton_pid: int) -> str:
    args = Path(f"/proc/{triton_pid}/cmdline").read_bytes().decode().split("\0")
    return next(a.split("shm-region-prefix-name=")[1] for a in args if "shm-region-prefix-name=" in a)


def _regions(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(prefix))


def _post(port: int, path: str, body: bytes, content_type: str, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body), or (0, b"") when the server dropped the connection (it crashed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


@pytest.mark.server
@pytest.mark.slow
def test_serve_comes_back_after_kill_and_one_request_crashes(served_repository, catalogue_index, grocery_photos,
                                                             tmp_path):
    import shutil

    from conftest import served_config
    from mildnet.serving.client import TritonEmbedder
    from mildnet.serving.contract import EMBEDDING_MODEL
    from mildnet.serving.repository import render_model_config, render_pipeline

    # A copy holding only the version the session's index was built with (other tests export newer versions)
    session_repo, _, info = served_repository
    repo = tmp_path / "model_repository"
    shutil.copytree(session_repo, repo)
    for version in (repo / EMBEDDING_MODEL).iterdir():
        if version.is_dir() and version.name.isdigit() and int(version.name) != info.version:
            shutil.rmtree(version)
    # every config follows the kept version again (the last export rendered them for the newest one)
    render_model_config(repo, served_config(), info)
    render_pipeline(repo, served_config(), info)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    core = max(os.sched_getaffinity(0))  # pinned: the restarted server must stay on its cores too
    out = open(tmp_path / "serve.out", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "mildnet", "serve", "--repository", str(repo),
                              "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                              "--metrics-port", str(metrics_port), "--poll-secs", "0", "--cpus", str(core),
                              "--log-file", str(tmp_path / "tritonserver.log")],
                             stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    photos = [p.read_bytes() for p in grocery_photos[:3]]
    clients = []
    try:
        _wait(lambda: _ready(http_port), 300, "mildnet serve to be ready")
        triton = _triton_pid(serve.pid)
        assert os.sched_getaffinity(triton) == {core}
        prefix = _shm_prefix(triton)
        regions_at_start = _regions(prefix)
        assert regions_at_start, "the Python backend's stubs should hold regions under this server's prefix"
        clients = [TritonEmbedder(f"127.0.0.1:{http_port}", "http", timeout=30),
                   TritonEmbedder(f"127.0.0.1:{grpc_port}", "grpc", timeout=30)]
        want = clients[0].embed(photos)
        want_hits = [(h.id, h.score) for h in clients[0].similar(photos[0], k=3)]

        def same_answers():
            for c in clients:
                np.testing.assert_allclose(c.embed(photos), want, atol=1e-6)
                assert [(h.id, round(h.score, 5)) for h in c.similar(photos[0], k=3)] == \
                    [(i, round(s, 5)) for i, s in want_hits]

        same_answers()

        # The shared-memory API (registering a stub's own region is a one-request SIGSEGV) needs the key.
        for region in regions_at_start[:1]:
            body = f'{{"key": "{region}", "offset": 0, "byte_size": 64}}'.encode()
            status, text = _post(http_port, "/v2/systemsharedmemory/region/evil/register", body, "application/json")
            assert status == 403 and ADMIN_KEY_HEADER.encode() in text, (status, text[:200])
            status, text = _post(http_port, "/v2/repository/models/mildnet/unload", b"{}", "application/json")
            assert status == 403, (status, text[:200])
        assert _triton_pid(serve.pid) == triton, "a refused restricted call must not restart the server"

        crashes = [("SIGKILL", lambda: os.kill(triton, signal.SIGKILL)),
                   # Triton 2.51 dies (SIGSEGV) on a form-encoded body >= 4 MB, even to a model that does not exist
                   ("form-encoded 4 MB body", lambda: _post(http_port, "/v2/models/mildnet/infer",
                                                            os.urandom(4 * 1024 * 1024 + 17),
                                                            "application/x-www-form-urlencoded"))]
        for what, crash in crashes:
            old = _triton_pid(serve.pid)
            crash()
            _wait(lambda: _triton_pid(serve.pid) not in (old, None) or not _ready(http_port), 30,
                  f"tritonserver to die after the {what}")
            back = _wait(lambda: _ready(http_port), 300, f"the server to come back after the {what}")
            new = _triton_pid(serve.pid)
            assert new not in (None, old), f"{what}: expected a new tritonserver process"
            assert os.sched_getaffinity(new) == {core}, f"{what}: the restarted server left its cores"
            same_answers()
            # No leak: the dead server's regions were removed, the new one holds as many as the first
            assert len(_regions(prefix)) == len(regions_at_start), (what, _regions(prefix), regions_at_start)
            print(f"{what}: back in {back:.1f} s")

        for c in clients:  # open keep-alive connections would make Triton wait out its exit timeout
            c.close()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
        log = (tmp_path / "serve.out").read_text()
        assert "tritonserver died (killed by SIGKILL)" in log
        assert log.count("tritonserver ready again after") == 2, log[-2000:]
        assert _regions(prefix) == [], "shared memory left behind after a clean stop"
        assert _triton_pid(serve.pid) is None
    finally:
        for c in clients:
            c.close()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
        out.close()

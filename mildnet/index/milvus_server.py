"""A real Milvus standalone server on 127.0.0.1 only, for tests, benchmarks and a one-machine setup.

PyPI's ``milvus`` wheel (2.3.5, "embedded Milvus") ships the standalone server binary with its own etcd.
Its gRPC, HTTP and internal ports listen on EVERY interface whatever its config says (checked with ``ss``:
the ``<component>.ip`` settings only change the address it advertises). So the server runs in its own network
namespace, where only a loopback interface exists, and a small forwarder in the same process group relays
``127.0.0.1:<port>`` of this machine to its gRPC port: nothing it opens is reachable from another host.

    with MilvusServer(data_dir, port=0) as server:     # waits until it answers
        index = create_index(1024, backend="milvus", uri=server.uri, model_version="m:1")

``stop()`` sends SIGTERM to the whole process group (forwarder, wrapper, milvus binary), then SIGKILL after
a deadline (15 s: the binary has been seen taking 25-40 s to act on SIGTERM; its data is safe either way:
everything acknowledged is in its write-ahead log, see the kill test). ``kill()`` is the SIGKILL a crash test uses;
``start()`` again on the same data folder and port brings the same collections back.

The forwarder entry point is ``python -m mildnet.index.milvus_server --data DIR --port N`` (run by
:class:`MilvusServer`; Linux only: it needs ``unshare(CLONE_NEWNET)``, as root or through a user namespace).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import MildnetError, UsageError

MILVUS_GRPC_PORT = 19530  # inside the namespace: every port there is free, so the defaults are used
PORT_FILE = "mildnet-forward.port"  # the forwarder writes the host port it listens on here, once listening
LOG_FILE = "mildnet-forward.log"
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


class MilvusServerError(MildnetError, RuntimeError):
    """The Milvus server could not be started, did not become ready, or is not installed."""


class MilvusServer:
    """One Milvus standalone server process group (see module docstring).

    Args:
        data_dir: where Milvus keeps everything (etcd, segments, logs). Created if missing.
        port: host port on 127.0.0.1 for gRPC (0 picks a free one; kept across restarts).
        remove_data: delete ``data_dir`` in :meth:`stop` (tests).
    """

    def __init__(self, data_dir: str | os.PathLike, port: int = 0, *, remove_data: bool = False) -> None:
        if not 0 <= int(port) < 65536:
            raise UsageError(f"port must be 0..65535, got {port}")
        self.data_dir = Path(data_dir).resolve()
        self.port = int(port)
        self.remove_data = remove_data
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 240.0) -> "MilvusServer":
        """Start the server and wait until a client can list its collections; MilvusServerError if not."""
        if self._proc is not None and self._proc.poll() is None:
            raise MilvusServerError(f"Milvus server already running (pid {self._proc.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / PORT_FILE
        port_file.unlink(missing_ok=True)
        log = open(self.data_dir / LOG_FILE, "ab")
        try:
            # A new session: the forwarder's pid is the group id, so stop() reaches the milvus binary too.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mildnet.index.milvus_server", "--data", str(self.data_dir),
                 "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise MilvusServerError(f"Milvus forwarder did not start in {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        self._wait_ready(deadline)
        return self

    def _check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise MilvusServerError(f"Milvus server exited (code {code}): {self.log_tail()}")

    def _wait_ready(self, deadline: float) -> None:
        from pymilvus import MilvusClient

        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                client = MilvusClient(self.uri, timeout=5)
                try:
                    client.list_collections()
                    return
                finally:
                    client.close()
            except Exception as e:  # not up yet: pymilvus raises its own types
                last = str(e)[:200]
                time.sleep(1.0)
        self.stop()
        raise MilvusServerError(f"Milvus server not ready before the deadline ({last}): {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in (LOG_FILE, "logs/milvus-stderr.log"):
            path = self.data_dir / name
            if path.is_file():
                text += f"\n--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return text or "(no log)"

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole server at once (a crash, for fault tests); the data folder stays."""
        if self._proc is not None:
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
            self._wait_group_gone(10.0)
            self._proc = None

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._proc.poll()  # reap the forwarder: a zombie would still count as a member of the group
            try:
                os.killpg(self._proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout`` s; remove the data if asked."""
        if self._proc is not None:
            self._signal_group(signal.SIGTERM)
            if not self._wait_group_gone(timeout):
                self._signal_group(signal.SIGKILL)
                self._wait_group_gone(10.0)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        if self.remove_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "MilvusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the forwarder process (runs in the new network namespace) ----------------------------------------------
def _unshare_network() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        first = ctypes.get_errno()
        # Not root: a user namespace grants the capability over a network namespace it creates.
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            raise MilvusServerError(f"cannot create a private network namespace for Milvus "
                                    f"({os.strerror(first)}; {os.strerror(ctypes.get_errno())})")
    # Bring the namespace's loopback up (SIOCGIFFLAGS / SIOCSIFFLAGS, IFF_UP).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay(client: socket.socket) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", MILVUS_GRPC_PORT), timeout=10)
    except OSError:
        client.close()  # the server is not up (yet): the client sees a closed connection and retries
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    t.start()
    _pump(client, upstream)
    t.join()
    client.close()
    upstream.close()


def _serve(data_dir: Path, port: int) -> int:
    from milvus import MilvusServer as EmbeddedMilvus, MilvusServerConfig

    # The host-side listener is made BEFORE leaving the host's network namespace: it stays there.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise MilvusServerError(f"127.0.0.1:{port} is in use") from None
        raise
    listener.listen(64)
    _unshare_network()

    config = MilvusServerConfig()
    server = EmbeddedMilvus(config, wait_for_started=False)
    server.set_base_dir(str(data_dir))
    config.set("proxy_port", MILVUS_GRPC_PORT)
    for component in _COMPONENTS:  # advertise loopback (the namespace has nothing else anyway)
        config.set(f"{component}.ip", "127.0.0.1")
    server.start()
    binary = server.server_proc

    def _on_term(signum, _frame):
        binary.send_signal(signum)

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)

    def _accept() -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=_relay, args=(client,), daemon=True).start()

    threading.Thread(target=_accept, daemon=True).start()
    tmp = data_dir / (PORT_FILE + ".tmp")
    tmp.write_text(str(listener.getsockname()[1]))
    os.replace(tmp, data_dir / PORT_FILE)
    code = binary.wait()  # the forwarder lives exactly as long as the server
    print(f"milvus exited with code {code}", flush=True)
    return 0 if code in (0, -signal.SIGTERM) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Milvus standalone on 127.0.0.1 only (see mildnet.index.milvus_server)")
    parser.add_argument("--data", required=True, help="Milvus data folder")
    parser.add_argument("--port", type=int, default=0, help="host port on 127.0.0.1 (0: a free one)")
    args = parser.parse_args(argv)
    try:
        return _serve(Path(args.data).resolve(), args.port)
    except MilvusServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

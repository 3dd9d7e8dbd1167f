"""Find, assemble and launch Triton Inference Server on a model repository; readiness; clean shutdown.

``tritonserver`` is taken from PATH (NVIDIA's container) or else from the ``nvidia-pytriton`` wheel, which
ships a complete Triton 2.51 but no ready-to-use backend folder: we assemble one under
``<venv>/var/mildnet/triton/backends/python`` (:func:`default_build_dir`) with the wheel's
``libtriton_python.so``, ``triton_python_backend_utils.py`` and the Python stub built for the running
interpreter, so ``model.py`` files run in this venv's Python and can import ``mildnet`` and ``torch``.

    with TritonServer("model_repository") as server:   # free ports, log file, waits until ready
        print(server.http_url, server.grpc_url, server.metrics_url)

``mildnet serve`` is the command-line face: it binds 127.0.0.1 unless ``--host`` says otherwise, prints the
endpoints, supervises the server (:func:`supervise`: a crashed or killed tritonserver is logged, its shared
memory removed and started again with back-off, on the same ports) and stops it cleanly on SIGTERM or Ctrl-C.

Hardening that Triton's own flags allow (see docs/reliability.md):

* each server gets its own Python-backend shared-memory prefix (``shm_prefix``), so the ``/dev/shm`` regions a
  crashed server leaves behind are removed without touching any other server's;
* the shared-memory, model-repository, logging and trace APIs are restricted (HTTP and gRPC) behind a key
  generated per server (``admin_key``, sent as the ``ADMIN_KEY_HEADER`` header; `--http-restricted-api`, `--grpc-restricted-protocol`): registering shared memory
  that points at a stub's region is a one-request crash of Triton 2.51, so strangers must not reach it.

Triton 2.51 has no request-body limit and crashes (SIGSEGV) on a form-encoded body of 4 MB or more (upstream
issue #5840); the supervisor brings it back within seconds, and beyond localhost it belongs behind a gateway
that refuses form-encoded bodies and caps their size.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import MildnetError

# The sys.path folder this `mildnet` was imported from (a checkout, or site-packages): the Triton Python stubs
# need it on their path. Counted from this module's dotted name, so it stays right wherever the module lives.
# A code location, not a data one: nothing is read from or written there.
IMPORT_ROOT = Path(__file__).resolve().parents[__name__.count(".")]


def default_build_dir() -> Path:
    """Where the assembled Python backend and the server logs go: inside the running environment (the stub is
    picked for this interpreter from this environment's nvidia-pytriton), or the user's cache when that
    environment is read-only (a system Python). ``MILDNET_TRITON_DIR`` overrides both."""
    if os.environ.get("MILDNET_TRITON_DIR"):
        return Path(os.environ["MILDNET_TRITON_DIR"])
    if os.access(sys.prefix, os.W_OK):
        return Path(sys.prefix) / "var" / "mildnet" / "triton"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mildnet" / f"triton-py{sys.version_info.major}.{sys.version_info.minor}"


DEFAULT_BUILD_DIR = default_build_dir()
LOG_TAIL_LINES = 40
SHM_DIR = Path("/dev/shm")
# Triton APIs a client of the similarity service never needs; each is a way to crash or reconfigure the server.
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace")
ADMIN_KEY_HEADER = "mildnet-admin-key"  # lower case: gRPC metadata keys must be


class ServerStartError(MildnetError, RuntimeError):
    """Triton could not be found or did not become ready; the message carries the tail of its log."""


class CpuSetError(MildnetError, ValueError):
    """A core list that is malformed or names cores this process may not run on."""


def parse_cpus(text: str) -> set[int]:
    """``"0-2,5"`` -> ``{0, 1, 2, 5}`` (taskset's list syntax), checked against the cores this process may use."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise CpuSetError(f"cannot read core list {text!r}: use numbers and ranges, e.g. 0-2,5") from None
        if first > last:
            raise CpuSetError(f"core range {part.strip()!r} runs backwards")
        cpus.update(range(first, last + 1))
    return check_cpus(cpus)


def check_cpus(cpus) -> set[int]:
    allowed = os.sched_getaffinity(0)
    cpus = set(cpus)
    if not cpus:
        raise CpuSetError("the core list is empty")
    if not cpus <= allowed:
        raise CpuSetError(f"cores {sorted(cpus - allowed)} are not available here (allowed: {sorted(allowed)})")
    return cpus


class ShmPrefixError(MildnetError, ValueError):
    """A shared-memory prefix that could name another server's regions."""


@dataclass(frozen=True)
class TritonInstallation:
    """Where the server binary, its backends and its shared libraries live."""

    binary: Path
    backend_dir: Path | None  # None: the binary's own default (NVIDIA's container)
    library_path: list[Path]
    source: str  # "PATH" or "nvidia-pytriton wheel"


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # noqa: F401  (only to locate the wheel's files)
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def _python_libdir() -> list[Path]:
    """The running interpreter's libpython folder, so the stub embeds the same Python as this venv."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if libdir and soname and (Path(libdir) / soname).exists():
        return [Path(libdir)]
    return []


def assemble_python_backend(build_dir: Path = DEFAULT_BUILD_DIR) -> Path:
    """Copy the wheel's Python backend plus the stub for this interpreter into ``build_dir/backends/python``.

    Returns the backend directory to pass as ``--backend-directory``. Idempotent: files are only copied
    when missing or changed (size/mtime), and each copy is atomic so a concurrent start never sees half a file.
    """
    root = _pytriton_root()
    if root is None:
        raise ServerStartError("tritonserver is not on PATH and the nvidia-pytriton wheel is not installed "
                               "(pip install nvidia-pytriton==0.7.0)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerStartError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version} "
                               f"(looked for {stub})")
    target = build_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [root / "backends" / "python" / "libtriton_python.so",
               root / "backends" / "python" / "triton_python_backend_utils.py", stub]
    for src in sources:
        dst = target / src.name
        s = src.stat()
        if dst.exists() and dst.stat().st_size == s.st_size and dst.stat().st_mtime >= s.st_mtime:
            continue
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{src.name}.")
        os.close(fd)
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    return target.parent


def find_tritonserver(build_dir: Path = DEFAULT_BUILD_DIR) -> TritonInstallation:
    """``tritonserver`` from PATH (NVIDIA's container), else from the nvidia-pytriton wheel."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstallation(Path(on_path), None, [], "PATH")
    backend_dir = assemble_python_backend(build_dir)
    root = _pytriton_root()
    assert root is not None
    libs = root.parents[1] / "nvidia_pytriton.libs"
    return TritonInstallation(root / "bin" / "tritonserver", backend_dir, _python_libdir() + [libs],
                              "nvidia-pytriton wheel")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now (a tiny race remains; start() retries once on 'address in use')."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server_env(installation: TritonInstallation) -> dict[str, str]:
    """Environment for the server and its Python stubs: find its libraries, import mildnet and the venv."""
    env = dict(os.environ)
    if installation.library_path:
        parts = [str(p) for p in installation.library_path] + [env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in parts if p)
    # The stub embeds libpython but not this venv: hand it mildnet's import root and the venv's site-packages.
    paths = [str(IMPORT_ROOT)] + site.getsitepackages() + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def signal_name(returncode: int | None) -> str:
    """A process exit code as words: ``-9`` -> ``"killed by SIGKILL"``, ``1`` -> ``"exit code 1"``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def remove_shm_regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Delete the shared-memory files whose name starts with ``prefix``; returns their names.

    Only for a prefix that belongs to a server that is no longer running: its Python stubs' regions are
    otherwise leaked for good when the server dies without unloading its models (crash, SIGKILL, OOM kill)."""
    if not prefix or "/" in prefix:
        raise ShmPrefixError(f"not a shared-memory prefix: {prefix!r}")
    removed = []
    try:
        entries = list(shm_dir.iterdir())
    except OSError:
        return removed
    for path in entries:
        if path.name.startswith(prefix):
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
    return sorted(removed)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


class TritonServer:
    """A tritonserver process on a model repository; a context manager for tests, benches and ``mildnet serve``.

    Ports given as 0 are picked free. ``model_control_mode="poll"`` (the default) makes the server pick up
    versions that ``mildnet export`` writes while it runs; ``"none"`` loads once.
    """

    def __init__(self, repository: str | os.PathLike, host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, *, log_file: str | os.PathLike | None = None,
                 model_control_mode: str = "poll", poll_secs: int = 2, log_verbose: int = 0,
                 exit_timeout_secs: int = 10, extra_args: list[str] | None = None,
                 build_dir: Path = DEFAULT_BUILD_DIR, cpus: set[int] | None = None):
        self.repository = Path(repository).resolve()
        self.host = host
        self._ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log_file = Path(log_file) if log_file else None
        self.model_control_mode = model_control_mode
        self.poll_secs = poll_secs
        self.log_verbose = log_verbose
        self.exit_timeout_secs = exit_timeout_secs
        self.extra_args = list(extra_args or [])
        self.build_dir = Path(build_dir)
        self.process: subprocess.Popen | None = None
        self.installation: TritonInstallation | None = None
        self.ports: dict[str, int] = {}
        # Unique per server object (pid + random): the regions of a crashed server are found by this prefix.
        self.shm_prefix = f"mildnet_{os.getpid()}_{secrets.token_hex(4)}_"
        self.admin_key = secrets.token_urlsafe(24)  # unlocks RESTRICTED_APIS; never printed
        self.restarts = 0
        # The cores tritonserver and its stubs may run on (inherited at fork; the stubs size their torch thread
        # pools from it): keeps a server off the cores of a load generator or of other services.
        self.cpus = check_cpus(cpus) if cpus is not None else None

    # -- endpoints -------------------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.ports['metrics']}/metrics"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        assert self.installation is not None
        cmd = [str(self.installation.binary), f"--model-repository={self.repository}",
               f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
               f"--http-port={self.ports['http']}", f"--grpc-port={self.ports['grpc']}",
               f"--metrics-port={self.ports['metrics']}", f"--model-control-mode={self.model_control_mode}",
               f"--exit-timeout-secs={self.exit_timeout_secs}", f"--log-verbose={self.log_verbose}",
               "--allow-metrics=true", "--strict-readiness=true",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}"
        cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if self.model_control_mode == "poll":
            cmd.append(f"--repository-poll-secs={self.poll_secs}")
        if self.installation.backend_dir is not None:
            cmd.append(f"--backend-directory={self.installation.backend_dir}")
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Launch and block until ``/v2/health/ready``; raise :class:`ServerStartError` with the log tail."""
        if not self.repository.is_dir():  # a repository is build output: `mildnet export` renders it
            raise ServerStartError(f"model repository {self.repository} does not exist: run `mildnet export "
                                   f"--checkpoint CKPT --repository {self.repository}` first")
        if not any(p.is_dir() and p.name.isdigit() for m in self.repository.iterdir() if m.is_dir()
                   for p in m.iterdir()):
            raise ServerStartError(f"{self.repository} holds no model version folders: run "
                                   f"`mildnet export --checkpoint CKPT --repository {self.repository}` first")
        self.installation = find_tritonserver(self.build_dir)
        if self.log_file is None:
            log_dir = self.build_dir / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=log_dir, prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        for attempt in range(2):
            self.ports = {k: v or free_port(self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1")
                          for k, v in self._ports.items()}
            try:
                self._launch(timeout)
                return self
            except ServerStartError as e:
                if attempt == 0 and "address already in use" in str(e).lower() and 0 in self._ports.values():
                    continue  # lost the free-port race: pick new ports once
                raise
        return self

    def restart(self, timeout: float = 180.0) -> None:
        """Stop what is left of the server (process group, shared memory) and launch it again on the same ports."""
        self.stop()
        self.restarts += 1
        self._launch(timeout)

    def _pin(self) -> None:  # runs in the child between fork and exec
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def _launch(self, timeout: float) -> None:
        assert self.installation is not None and self.log_file is not None
        log = open(self.log_file, "ab")
        try:
            # Own session: Ctrl-C in a terminal reaches us, and we stop the server in order (see stop()).
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=_server_env(self.installation),
                                            start_new_session=True, preexec_fn=self._pin)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.stop()  # its stubs and shared memory too: a supervisor may try again at once
                raise ServerStartError(f"tritonserver exited with code {code} before it was ready "
                                       f"(log {self.log_file}):\n{_log_tail(self.log_file)}")
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(f"tritonserver was not ready after {timeout:.0f} s (log {self.log_file}):\n"
                               f"{_log_tail(self.log_file)}")

    def is_ready(self) -> bool:
        return _http_ok(f"http://{self.http_url}/v2/health/ready")

    def is_model_ready(self, name: str, version: str | int = "") -> bool:
        suffix = f"/versions/{version}" if version != "" else ""
        return _http_ok(f"http://{self.http_url}/v2/models/{name}{suffix}/ready")

    def wait_for_model(self, name: str, version: str | int = "", timeout: float = 60.0) -> None:
        """Block until a model (version) is ready, e.g. after ``mildnet export`` wrote a new version."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_model_ready(name, version):
                return
            if self.process is None or self.process.poll() is not None:
                break
            time.sleep(0.25)
        raise ServerStartError(f"model {name} version {version or 'latest'} not ready after {timeout:.0f} s "
                               f"(log {self.log_file}):\n{_log_tail(self.log_file)}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _log_tail(self.log_file, lines) if self.log_file else ""

    def stop(self) -> int | None:
        """SIGTERM, wait for Triton to unload models (it stops its Python stubs), then SIGKILL whatever is left
        of its process group. Returns the server's exit code (negative: killed by that signal)."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.exit_timeout_secs + 15)
            except subprocess.TimeoutExpired:
                pass  # stuck unloading: the group kill below ends it
        # Always, even when the server is already dead (crash, OOM kill, kill -9): its Python backend stubs share
        # its process group (start_new_session) and can outlive it for minutes, holding memory and shared memory.
        # The group id cannot be reused while any member lives, so this reaches only what the server started.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left
        proc.wait()
        self._wait_group_gone(proc.pid)
        # A clean exit unlinks the stubs' regions itself; after a crash or SIGKILL they stay until removed.
        remove_shm_regions(self.shm_prefix)
        return proc.returncode

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
        """Stubs die from the SIGKILL a moment later; wait so no stub is still mapping the regions we remove.
        Zombies count as gone: in a container nobody may ever reap them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_members(pgid):
            time.sleep(0.05)

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# -- supervision -------------------------------------------------------------------------------------------------
BACKOFF_SECS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # waits before restart n; the last repeats
STABLE_SECS = 60.0  # a server that ran this long before dying starts the back-off over


@dataclass
class SupervisorEvent:
    """One thing the supervisor saw: ``kind`` is "died", "restarting", "restarted" or "restart_failed"."""

    kind: str
    message: str
    restarts: int
    downtime_s: float | None = None


def supervise(server: TritonServer, stop: threading.Event, *, timeout: float = 300.0,
              on_event=lambda e: print(e.message, file=sys.stderr, flush=True),
              backoff: tuple[float, ...] = BACKOFF_SECS, stable_secs: float = STABLE_SECS,
              poll_secs: float = 0.5) -> None:
    """Keep a started ``server`` running until ``stop`` is set: when tritonserver dies (signal, crash, OOM kill)
    report why, remove what it left (process group, shared memory) and start it again on the same ports, waiting
    ``backoff[n]`` before the n-th consecutive restart. Between death and readiness the server's own
    ``/v2/health/ready`` refuses connections: readiness stays truthful. Returns when ``stop`` is set."""
    failures = 0
    started = time.monotonic()
    while not stop.is_set():
        proc = server.process
        if proc is not None and proc.poll() is None:
            stop.wait(poll_secs)
            continue
        died = time.monotonic()
        if proc is not None:  # it was running: say why it stopped (a failed restart has already said so)
            if died - started >= stable_secs:
                failures = 0
            on_event(SupervisorEvent("died", f"tritonserver died ({signal_name(proc.returncode)}); log tail:\n"
                                     f"{server.log_tail(10)}", server.restarts))
            server.stop()  # the process group and the shared memory it leaves behind
        delay = backoff[min(failures, len(backoff) - 1)]
        on_event(SupervisorEvent("restarting", f"restarting tritonserver in {delay:.0f} s "
                                 f"(restart {server.restarts + 1})", server.restarts))
        if stop.wait(delay):
            break
        try:
            server.restart(timeout)
        except ServerStartError as e:
            failures += 1
            on_event(SupervisorEvent("restart_failed", f"restart {server.restarts} failed: {e}", server.restarts))
            continue
        failures += 1
        started = time.monotonic()
        on_event(SupervisorEvent("restarted", f"tritonserver ready again after {started - died:.1f} s "
                                 f"(restart {server.restarts})", server.restarts, started - died))

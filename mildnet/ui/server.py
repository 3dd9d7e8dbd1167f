"""Running the search page with uvicorn: in the foreground (``mildnet ui``) or on a thread (the demo, tests,
the bench). 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import socket
import threading
import time

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PageServer:
    """uvicorn serving ``app`` on a background thread; a context manager. Port 0 picks a free one."""

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "warning"):
        import uvicorn  # lazy: the optional `ui` extra

        self.host = host
        self.port = port or _free_port(host)
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                                     access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> "PageServer":
        self._thread = threading.Thread(target=self._server.run, name="mildnet-ui", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the search page did not start on {self.host}:{self.port} "
                                   "(port in use?)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(15)
            self._thread = None

    def __enter__(self) -> "PageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

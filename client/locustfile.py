"""Load test of a mildnet Triton server: simulated users send real photos to ``mildnet_ensemble`` (embed) and
``similar`` (visual search) over HTTP and gRPC.

    locust -f client/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 \\
        --grpc-host 127.0.0.1:8001 --images path/to/photos --csv out/locust --html out/locust.html
    make loadtest                       # the same, results under bench/results/locust/
    MILDNET_PAGE_URL=http://127.0.0.1:8090 locust -f client/locustfile.py ...   # + the search page's users

With ``MILDNET_PAGE_URL`` (or ``--page-host``) naming a running search page (``mildnet ui``), a third kind of
user posts the photos to its ``/api/search`` (the browser's path: web layer + Triton ``similar``).

Half the users speak HTTP, half gRPC; each user owns its own tritonclient client (the HTTP client is not
thread-safe, and gevent runs every user in one thread). gRPC runs on gevent after
``grpc.experimental.gevent.init_gevent()``, called before any channel exists. A response counts as a
failure when Triton returns an error or the output is malformed (wrong shape, NaN, no hits), so a clean run
proves the server answered every request correctly under load.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before tritonclient.grpc opens any channel

import numpy as np  # noqa: E402
from locust import HttpUser, User, between, events, task  # noqa: E402

from mildnet.serving import contract as c  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "grocery" / "dataset" / "val"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_images: list[bytes] = []
# After locust's last step, how long a normal exit may take before it is forced.
EXIT_GRACE_SECS = float(os.environ.get("MILDNET_LOCUST_EXIT_GRACE", "10"))


@events.quit.add_listener
def _exit_for_sure(exit_code: int, **_kw) -> None:
    """Locust has printed and written its results; make sure the process then ends. About 1 run in 3 hung here
    (gRPC's gevent integration at interpreter exit), ignoring SIGTERM because gevent's signal handler never ran.
    A plain OS thread (not a greenlet) ends the process with locust's exit code if it is still alive after
    EXIT_GRACE_SECS."""
    from gevent import monkey

    start_thread = monkey.get_original("_thread", "start_new_thread")
    real_sleep = monkey.get_original("time", "sleep")

    def watchdog() -> None:
        real_sleep(EXIT_GRACE_SECS)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(exit_code)

    start_thread(watchdog, ())


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--images", type=str, env_var="MILDNET_LOCUST_IMAGES", default=str(DEFAULT_IMAGES),
                        help="folder of query photos (searched recursively)")
    parser.add_argument("--max-images", type=int, env_var="MILDNET_LOCUST_MAX_IMAGES", default=200,
                        help="load at most this many photos into memory")
    parser.add_argument("--grpc-host", type=str, env_var="MILDNET_GRPC_URL", default="127.0.0.1:8001",
                        help="Triton gRPC host:port (HTTP uses --host)")
    parser.add_argument("--k", type=int, env_var="MILDNET_LOCUST_K", default=5, help="k for `similar`")
    parser.add_argument("--page-host", type=str, env_var="MILDNET_PAGE_URL", default="",
                        help="the search page's base URL (mildnet ui); its users run only when this is set")


@events.init.add_listener
def _load_images(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    folder = Path(opts.images)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"locustfile: no images (*{', *'.join(IMAGE_SUFFIXES)}) under {folder}; set --images")
    random.Random(0).shuffle(files)
    _images[:] = [p.read_bytes() for p in files[: opts.max_images]]


class _TritonUser(User):
    """Shared task logic; subclasses provide ``protocol`` and ``_connect``."""

    abstract = True
    wait_time = between(0.0, 0.05)
    protocol = "?"

    def on_start(self) -> None:
        self.client = self._connect()
        self.k = int(self.environment.parsed_options.k)

    def on_stop(self) -> None:
        close = getattr(self.client, "close", None)
        if close:
            close()

    def _call(self, name: str, inputs, outputs: list[str], check) -> None:
        """One inference, timed and reported to locust; ``check(result)`` raises on a malformed answer."""
        start = time.perf_counter()
        exc, size = None, 0
        try:
            result = self.client.infer(name, inputs, outputs=[self._mod.InferRequestedOutput(o) for o in outputs])
            arrays = {o: result.as_numpy(o) for o in outputs}
            size = sum(a.nbytes for a in arrays.values() if a is not None)
            check(arrays)
        except Exception as e:  # noqa: BLE001 - every failure is a reported failure, never a crash
            # tritonclient's exceptions have an empty repr; locust groups failures by it
            exc = RuntimeError(f"{type(e).__name__}: {str(e)[:300]}")
        self.environment.events.request.fire(
            request_type=self.protocol, name=name, response_time=(time.perf_counter() - start) * 1000,
            response_length=size, exception=exc, context={})

    def _image_input(self):
        t = self._mod.InferInput(c.IMAGE, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[random.choice(_images)]], dtype=object))
        return t

    @task(3)
    def embed(self) -> None:
        def check(out):
            e = out[c.EMBEDDING]
            if e is None or e.ndim != 2 or e.shape[0] != 1 or not np.isfinite(e).all():
                raise ValueError(f"malformed EMBEDDING {None if e is None else e.shape}")
            if abs(float(np.linalg.norm(e)) - 1.0) > 1e-3:
                raise ValueError("embedding is not unit-norm")

        self._call(c.ENSEMBLE_MODEL, [self._image_input()], [c.EMBEDDING], check)

    @task(1)
    def similar(self) -> None:
        k = self._mod.InferInput(c.K, [1, 1], "INT32")
        k.set_data_from_numpy(np.array([[self.k]], dtype=np.int32))

        def check(out):
            ids, scores, meta = out[c.IDS], out[c.SCORES], out[c.METADATA]
            if ids is None or ids.shape[-1] < 1 or scores.shape != ids.shape:
                raise ValueError("similar returned no hits")
            if not np.all(np.diff(scores[0]) <= 1e-6):
                raise ValueError("similar's scores are not sorted")
            json.loads(meta[0][0])

        self._call(c.SIMILAR_MODEL, [self._image_input(), k], list(c.SIMILAR_OUTPUTS), check)


class HttpTritonUser(_TritonUser):
    protocol = "HTTP"

    def _connect(self):
        import tritonclient.http as mod

        self._mod = mod
        host = (self.host or "http://127.0.0.1:8000").split("://", 1)[-1].rstrip("/")
        return mod.InferenceServerClient(host, connection_timeout=60, network_timeout=60)


class GrpcTritonUser(_TritonUser):
    protocol = "gRPC"

    def _connect(self):
        import tritonclient.grpc as mod

        self._mod = mod
        return mod.InferenceServerClient(self.environment.parsed_options.grpc_host)


class PageUser(HttpUser):
    """The search page's search endpoint: the photo's bytes as the body, the hits back as JSON."""

    abstract = not os.environ.get("MILDNET_PAGE_URL")  # only against a page that runs
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.search_url = f"{(opts.page_host or os.environ['MILDNET_PAGE_URL']).rstrip('/')}/api/search?k={opts.k}"

    @task
    def page_search(self) -> None:
        with self.client.post(self.search_url, data=random.choice(_images), name="page /api/search",
                              headers={"Content-Type": "image/jpeg"}, catch_response=True) as r:
            try:
                hits = r.json()["hits"] if r.status_code == 200 else None
            except ValueError:
                hits = None
            if not hits:
                r.failure(f"page search: HTTP {r.status_code}: {r.text[:300]}")


if os.environ.get("MILDNET_LOCUST_PROTOCOLS"):  # e.g. "http" to run one protocol only
    _wanted = {p.strip().lower() for p in os.environ["MILDNET_LOCUST_PROTOCOLS"].split(",")}
    if "http" not in _wanted:
        HttpTritonUser.abstract = True
    if "grpc" not in _wanted:
        GrpcTritonUser.abstract = True
    if "page" not in _wanted:
        PageUser.abstract = True

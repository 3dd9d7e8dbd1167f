"""The search page's web app (Starlette, served by uvicorn): a thin gateway in front of Triton's ``similar``.

    GET  /                      the page (static/index.html, app.js, app.css: no build step, no CDN)
    GET  /api/status            served model, index size and categories, server state (the page polls it)
    POST /api/search?k=&category=&name=     body: the photo's bytes (image/* or application/octet-stream)
    GET  /api/similar?image=REL&k=&category= "more like this": search with a catalogue image
    GET  /thumbs/REL            a cached thumbnail of a catalogue image (REL cannot leave the catalogue root)

The photo is held in memory only: its size is checked against the limit before (Content-Length) and while
(streamed) it is read, it is decoded here with :func:`mildnet.imageio.decode_image` for a clear message, then
sent to Triton. Form bodies (multipart, url-encoded) are refused: a multipart parser spools large parts to disk,
and the page never sends one. Every error is JSON ``{"error": message, "kind": ...}``, never a traceback.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import MildnetError
from ..imageio import ImageDecodeError, decode_image
from ..index import IndexFileError
from ..serving.client import ModelNotReady, RemoteInferenceError, ServerUnavailable, TritonEmbedder
from .catalogue import FILTER_KEY, IndexFile
from .files import CatalogueFiles, NotInCatalogue

log = logging.getLogger("mildnet.ui")
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PAGE_K = 100  # a grid, not an export: the CLI and Triton allow more
STATUS_TTL_S = 1.0  # many pages polling share one look at the server per second
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
SECURITY_HEADERS = {
    # the page's own files only: no inline script, so an escaped-wrongly name still could not run
    "content-security-policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@dataclass
class UIConfig:
    urls: Sequence[str]
    index: Path
    protocol: str = "http"
    catalogue_root: Path | None = None  # default: the common folder of the indexed images
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    default_k: int = 10
    timeout_s: float = 30.0
    title: str = "mildnet visual search"
    extra: dict = field(default_factory=dict)


class PageError(MildnetError):
    """An error the page shows as it is: HTTP status, kind and a message for a person."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "kind": kind}, status_code=status)


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.0f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


class SearchPage:
    """The app's state: the Triton client, the index summary, the catalogue images, a cached server status."""

    def __init__(self, config: UIConfig, embedder: TritonEmbedder | None = None):
        self.config = config
        self.embedder = embedder or TritonEmbedder(list(config.urls), protocol=config.protocol,
                                                   timeout=config.timeout_s)
        self.index = IndexFile(config.index)
        self._files: CatalogueFiles | None = None
        self._status: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    # -- catalogue -------------------------------------------------------------------------------------------
    def files(self) -> CatalogueFiles | None:
        root = self.config.catalogue_root
        if root is None:
            try:
                root = self.index.summary().image_root
            except IndexFileError:
                root = None
        if root is None:
            return None
        with self._lock:
            if self._files is None or self._files.root != Path(root).resolve():
                self._files = CatalogueFiles(root)
            return self._files

    # -- server status ---------------------------------------------------------------------------------------
    def server_status(self) -> dict:
        with self._lock:
            if self._status and time.monotonic() - self._status[0] < STATUS_TTL_S:
                return self._status[1]
        try:
            info = self.embedder.model_info()
            state = {"state": "ready", "model": self.embedder.embedding_model, "version": info.version, "variant": info.variant,
                     "model_version": info.model_version}
            if not self.embedder.is_ready():
                state = {"state": "not_ready", "message": f"model {self.embedder.model!r} is not ready yet"}
        except ServerUnavailable as e:
            state = {"state": "down", "message": f"search server unavailable: {e}"}
        except ModelNotReady as e:
            state = {"state": "not_ready", "message": f"search server is up but the model is not ready: {e}"}
        with self._lock:
            self._status = (time.monotonic(), state)
        return state

    def status(self) -> dict:
        out: dict[str, Any] = {"title": self.config.title, "server": self.server_status(),
                               "max_upload_bytes": self.config.max_upload_bytes, "max_k": MAX_PAGE_K,
                               "default_k": self.config.default_k, "filter_key": FILTER_KEY}
        try:
            s = self.index.summary()
            out["index"] = {"size": s.size, "categories": s.categories, "model_version": s.model_version}
            served = out["server"].get("model_version")
            if served and s.model_version and served != s.model_version:
                out["index"]["warning"] = (f"the index was built with {s.model_version}, the server serves "
                                           f"{served}: rebuild the index")
        except IndexFileError as e:
            out["index"] = {"size": None, "categories": [], "error": str(e)}
        return out

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, image: bytes, k: int, category: str | None, name: str) -> tuple[dict, float]:
        """Runs in a worker thread: check the image here, then Triton ``similar``. Returns the hits as the page
        shows them and the seconds spent waiting for Triton (the rest is the web layer's own cost)."""
        try:
            with decode_image(image, max_bytes=self.config.max_upload_bytes, name=name) as img:
                size = img.size
        except ImageDecodeError as e:
            raise PageError(400, "bad_image", str(e)) from None
        filter = {FILTER_KEY: category} if category else None
        start = time.perf_counter()
        try:
            hits = self.embedder.similar(image, k=k, filter=filter)
        except ServerUnavailable as e:
            with self._lock:
                self._status = None  # the next status poll asks the server again
            raise PageError(503, "server_down", f"search server unavailable: {e}") from None
        except ModelNotReady as e:
            raise PageError(503, "not_ready", f"search server is up but the model is not ready: {e}") from None
        except RemoteInferenceError as e:
            raise PageError(422, "refused", f"the search server refused this image: {e}") from None
        triton_s = time.perf_counter() - start
        files = self.files()
        rows = []
        for rank, h in enumerate(hits, 1):
            meta = {k_: v for k_, v in h.metadata.items() if k_ != "path"}  # no server paths on the page
            image_name = files.relative(h.metadata.get("path")) if files else None
            rows.append({"rank": rank, "id": h.id, "score": round(float(h.score), 4),
                         "name": str(meta.get("name") or meta.get("item_id") or h.id),
                         "image": image_name, "metadata": meta})
        return {"query": {"name": name, "width": size[0], "height": size[1]}, "k": k, "category": category,
                "hits": rows}, triton_s


# -- request parsing ------------------------------------------------------------------------------------------------
def _k(request: Request, default: int) -> int:
    raw = request.query_params.get("k", str(default))
    try:
        k = int(raw)
    except ValueError:
        raise PageError(400, "bad_k", f"k must be a whole number, got {raw!r}") from None
    if not 1 <= k <= MAX_PAGE_K:
        raise PageError(400, "bad_k", f"k must be between 1 and {MAX_PAGE_K}, got {k}")
    return k


def _results(found: tuple[dict, float]) -> JSONResponse:
    """The hits, with Triton's share of the time in a Server-Timing header (browsers' dev tools show it)."""
    body, triton_s = found
    return JSONResponse(body, headers={"server-timing": f"triton;dur={triton_s * 1000:.2f}"})


def _category(request: Request) -> str | None:
    return request.query_params.get("category") or None


async def read_body(request: Request, limit: int) -> bytes:
    """The raw photo, at most ``limit`` bytes, in memory; a form body or an over-size one is refused."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in FORM_TYPES or not (ctype == "" or ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise PageError(415, "bad_body", f"send the photo's bytes as the request body (Content-Type image/* or "
                                         f"application/octet-stream), not {ctype!r}")
    declared = request.headers.get("content-length")
    too_big = PageError(413, "too_large", f"the file is larger than the {_mib(limit)} limit")
    if declared is not None:
        if not declared.isdigit():
            raise PageError(400, "bad_body", "Content-Length is not a number")
        if int(declared) > limit:
            raise too_big  # refused before reading a byte of it
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    if not body:
        raise PageError(400, "bad_image", "no photo in the request (empty body)")
    return bytes(body)


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- routes ---------------------------------------------------------------------------------------------------------
def create_app(config: UIConfig, embedder: TritonEmbedder | None = None) -> Starlette:
    page = SearchPage(config, embedder)

    async def index_page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in PAGE_FILES:
            return _error(404, "not_found", "no such page file")
        return FileResponse(STATIC / name, media_type=f"{PAGE_FILES[name]}; charset=utf-8")

    async def status(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(page.status), headers={"cache-control": "no-store"})

    async def search(request: Request) -> Response:
        k, category = _k(request, config.default_k), _category(request)
        name = request.query_params.get("name", "photo")[:200]
        image = await read_body(request, config.max_upload_bytes)
        return _results(await run_in_threadpool(page.search, image, k, category, name))

    async def similar(request: Request) -> Response:
        k, category = _k(request, config.default_k), _category(request)
        rel = request.query_params.get("image", "")
        files = page.files()
        if files is None:
            raise PageError(404, "not_found", "the catalogue's images are not available to this page")
        try:
            image = await run_in_threadpool(files.read, rel, config.max_upload_bytes)
        except NotInCatalogue:
            raise PageError(404, "not_found", "no such catalogue image") from None
        except ImageDecodeError as e:
            raise PageError(400, "bad_image", str(e)) from None
        return _results(await run_in_threadpool(page.search, image, k, category, rel))

    async def thumbnail(request: Request) -> Response:
        files = page.files()
        if files is None:
            return _error(404, "not_found", "the catalogue's images are not available to this page")
        try:
            data = await run_in_threadpool(files.thumbnail, request.path_params["path"])
        except NotInCatalogue:
            return _error(404, "not_found", "no such catalogue image")
        except ImageDecodeError:
            return _error(422, "bad_image", "this catalogue image cannot be decoded")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    async def page_error(request: Request, exc: PageError) -> Response:
        return _error(exc.status, exc.kind, exc.message)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal", "internal error in the search page (details in its log)")

    app = Starlette(routes=[
        Route("/", index_page),
        Route("/static/{name}", static_file),
        Route("/api/status", status),
        Route("/api/search", search, methods=["POST"]),
        Route("/api/similar", similar),
        Route("/thumbs/{path:path}", thumbnail),
    ], exception_handlers={PageError: page_error, Exception: unexpected},
        middleware=[Middleware(SecurityHeaders)])
    app.state.page = page
    return app

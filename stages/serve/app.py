"""The ASGI app: the JSON API under /api, thumbnails under /images/{row}, the page at /.

Every error a client can cause is a 4xx whose body is one JSON message, {"detail": "..."};
anything else is a 500 that says only that the server's log has the details.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from stages.serve.images import (
    ImageProblem,
    NoImage,
    decode_upload,
    recorded_image,
    thumbnail_png,
)
from stages.serve.service import BadRequest, SearchOff, Service, elapsed_ms
from store import UserError

log = logging.getLogger("structure-align.serve")
THUMBNAILS_CACHED = 256  # a 256 px PNG of a photo is up to ~200 KB: at most ~50 MB
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "style-src 'self' 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


class TooLarge(HTTPException):
    """A request body past the upload cap: an HTTPException, which FastAPI's body parsing lets
    through (any other exception there becomes a 400 "error parsing the body")."""

    def __init__(self, max_bytes: int):
        super().__init__(413, too_large_message(max_bytes))


def static_text(name: str) -> str:
    return (files("stages.serve") / "static" / name).read_text(encoding="utf-8")


class BodyLimit:
    """ASGI middleware: a body announced (Content-Length) past the cap is a 413 before it is
    read; one sent in chunks is stopped as soon as it grows past the cap."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": too_large_message(self.max_bytes)}, 413)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # raised inside the route's form parsing, which lets an HTTPException through
                raise TooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


def too_large_message(max_bytes: int) -> str:
    return f"the request is larger than the server's cap of {max_bytes / 2**20:g} MiB"


def validation_message(err: RequestValidationError) -> str:
    """FastAPI's list of problems as one line: `field: what is wrong`."""
    parts = []
    for problem in err.errors():
        where = [str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path")]
        parts.append(f"{'.'.join(where) or 'request'}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(service: Service) -> FastAPI:
    """The FastAPI app answering from `service` (a model and an optional index, loaded)."""
    limits = service.limits
    app = FastAPIOffline(  # /docs from the package's own Swagger UI files, not a CDN
        redoc_url=None,
        title="structure-align",
        summary="Search, classify and embed with an aligned model (STRUCTURE, NeurIPS 2025).",
        version="1",
    )
    page, script = static_text("index.html"), static_text("app.js")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(BadRequest)
    @app.exception_handler(ImageProblem)
    @app.exception_handler(UserError)  # the model's own argument checks
    async def bad_request(request: Request, err: Exception) -> JSONResponse:
        return error(400, str(err))

    @app.exception_handler(NoImage)
    @app.exception_handler(SearchOff)
    async def not_found(request: Request, err: Exception) -> JSONResponse:
        return error(404, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error(422, validation_message(err))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal error; the server's log has the details")

    def answer(results: list[dict[str, Any]], start: float) -> dict[str, Any]:
        return {"results": results, "run": str(service.run), "ms": elapsed_ms(start)}

    def upload(image: UploadFile) -> Any:
        return decode_upload(image.file.read(), limits.max_image_pixels)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/app.js", include_in_schema=False)
    def app_js() -> Response:
        return Response(script, media_type="text/javascript", headers=PAGE_HEADERS)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """The run, its models and layers, the index, the run's evaluation protocol, the caps."""
        return service.info()

    @app.get("/api/search")
    def search_text(
        q: str = Query(..., description="The text query."),
        k: int = Query(10, description="How many results."),
    ) -> dict[str, Any]:
        """The top-k indexed images for a text: rank, score (cosine), id, label, caption."""
        start = time.perf_counter()
        return answer(service.search_text(q, k), start)

    @app.post("/api/search")
    def search_image(
        image: UploadFile = File(..., description="The query image."),
        k: int = Form(10, description="How many results."),
    ) -> dict[str, Any]:
        """The top-k indexed images for an uploaded image (the same shape as the text search)."""
        start = time.perf_counter()
        return answer(service.search_image(upload(image), k), start)

    @app.post("/api/classify")
    def classify(
        image: UploadFile = File(..., description="The image to classify."),
        labels: list[str] = Form(
            ..., description="Class names: one field each, or one field of comma-separated names."
        ),
    ) -> dict[str, Any]:
        """Zero-shot probabilities of every label, highest first (templates averaged as in
        `classify`)."""
        start = time.perf_counter()
        return answer(service.classify(upload(image), labels), start)

    @app.post("/api/embed")
    def embed(
        texts: list[str] | None = Form(None, description="Texts, one field each."),
        image: UploadFile | None = File(None, description="Or one image."),
    ) -> dict[str, Any]:
        """Unit vectors of the shared space for texts or one image."""
        start = time.perf_counter()
        if (texts is None) == (image is None):
            raise BadRequest("give either `texts` (one form field each) or one `image`")
        if image is not None:
            vectors, modality = service.embed_image(upload(image)), "image"
        else:
            vectors, modality = service.embed_texts(texts or []), "text"
        return {
            "modality": modality,
            "dim": int(vectors.shape[1]),
            "embeddings": vectors.tolist(),
            "run": str(service.run),
            "ms": elapsed_ms(start),
        }

    @lru_cache(maxsize=THUMBNAILS_CACHED)
    def thumbnail(row: int) -> bytes:
        if service.index is None:
            raise NoImage("no index: the server was started without --index")
        rows = service.index.rows
        if not 0 <= row < len(rows):
            raise NoImage(f"no row {row}: the index has rows 0 to {len(rows) - 1}")
        return thumbnail_png(recorded_image(str(rows["path"].iloc[row]), limits.max_image_pixels))

    @app.get("/images/{row}", responses={200: {"content": {"image/png": {}}}})
    def image(row: int) -> Response:
        """A thumbnail (PNG) of the image at this row of the index: only images the index
        records, by row number."""
        return Response(
            thumbnail(row),
            media_type="image/png",
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    return app

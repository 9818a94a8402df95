"""GET / : the browser page (predict -> explain -> heatmap, the model card), and /static/*, its
script and style. Plain files from ``service/web``, nothing from a CDN: the page works offline.

Public (no API key) like /docs: the page holds no data; everything it shows comes from the API
with the key the user types into it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
STATIC_PREFIX = "/static/"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=WEB_DIR), name="static")

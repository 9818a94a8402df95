"""Where a registry's files live: a local folder or an S3-compatible bucket, behind fsspec's one interface.

``MODEL_REGISTRY`` is a path (``./models``: a folder, the embedded default) or a URL
(``s3://bucket/prefix``: any S3-compatible store through s3fs). For S3 the endpoint and the
credentials come from the standard variables, read by botocore itself: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (or a profile, an
instance role: whatever botocore finds). This module knows nothing of versions
(:mod:`shapcore.registry` lays them out); it imports neither torch nor a room.

What differs between the two is kept to what cannot be the same: a local write replaces a file
by ``rename`` (readers see the old file or the new one), an object store's single PUT is atomic
by nature. Every failure to reach the store becomes a :class:`StoreUnavailable` (a
:class:`shapcore.errors.UserError`) naming the registry and the cause, so that a CLI prints one
line and the API's watcher logs one.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shapcore.errors import UserError

#: botocore's client options for a remote store: fail in seconds when it does not answer (the
#: API's watcher polls every few seconds; a CLI should not hang), retry a dropped connection once.
S3_CLIENT_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 2, "mode": "standard"},
}


class StoreUnavailable(UserError):
    """The registry's store could not be read or written (down, unreachable, access denied)."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    """A URL (``s3://...``) rather than a local path."""
    return "://" in str(location)


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@contextmanager
def atomic_target(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file next to ``path`` for a writer that wants a file name (safetensors, an
    exporter, :func:`write_file_atomic`). When the block ends without an error the file is
    fsynced, given ``mode`` (``mkstemp``'s 0600 would hide it from an API replica or a worker
    that runs as another user) and renamed over ``path``: readers see the old file or the new
    one, never half of one. On an error it is removed and ``path`` is left as it was."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_target`: readers never see half a file."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def file_record(path: Path) -> dict[str, Any]:
    """What a version's metadata records of one of its files: its sha256 and its size."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def cache_slug(url: str) -> str:
    """A folder name for ``url``'s local cache: readable, and unique by a hash of the URL."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", url).strip("-")[:60]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Store:
    """The files under one root (a folder or ``s3://bucket/prefix``), by relative names ``a/b``."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.url = str(location)
        self.remote = is_remote(self.url)
        self._fs: Any = None
        self._base = ""
        self._pid = -1

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made anew in each process: s3fs's is not fork-safe (a worker's
        work horse is a fork of its parent)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            options: dict[str, Any] = {}
            if self.remote:
                options = {"skip_instance_cache": True, "use_listings_cache": False,
                           "config_kwargs": S3_CLIENT_CONFIG}  # fmt: skip
            self._fs, self._base = fsspec.core.url_to_fs(self.url, **options)
            self._pid = os.getpid()
        return self._fs

    def key(self, name: str = "") -> str:
        """The filesystem's path of ``name`` (relative to the root)."""
        fs = self.fs
        return f"{self._base.rstrip('/')}/{name}" if name else self._base or fs.root_marker

    @contextmanager
    def reaching(self, what: str) -> Iterator[None]:
        """Turn any failure but a missing file into :class:`StoreUnavailable` ("registry URL: cannot WHAT: ...")."""
        try:
            yield
        except (FileNotFoundError, UserError):
            raise
        except Exception as exc:  # botocore, aiohttp and OSError alike: the store failed
            raise StoreUnavailable(f"registry {self.url}: cannot {what}: {_short(exc)}") from None

    # -- reading -----------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        """The content of ``name``; FileNotFoundError when there is none."""
        with self.reaching(f"read {name}"):
            return self.fs.cat_file(self.key(name))

    def exists(self, name: str) -> bool:
        with self.reaching(f"look up {name}"):
            return bool(self.fs.exists(self.key(name)))

    def glob(self, pattern: str) -> list[str]:
        """Relative names matching ``pattern`` (``*/metadata.json``); [] when the root does not exist."""
        base = self.key().rstrip("/") + "/"
        with self.reaching("list the versions"):
            found = self.fs.glob(base + pattern)
        return [str(p)[len(base) :] if str(p).startswith(base) else str(p) for p in found]

    def download(self, name: str, dest: Path) -> None:
        """Copy ``name`` to ``dest`` through a temporary file: ``dest`` is whole or absent."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            with self.reaching(f"download {name}"):
                self.fs.get_file(self.key(name), tmp)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    # -- writing -----------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace ``name`` at once: one PUT on a store, a rename in a folder."""
        with self.reaching(f"write {name}"):
            if self.remote:
                self.fs.pipe_file(self.key(name), data)
                return
            write_file_atomic(Path(self.key(name)), data)

    def upload(self, source: Path, name: str) -> None:
        with self.reaching(f"upload {name}"):
            self.fs.put_file(str(source), self.key(name))

    def remove(self, name: str) -> None:
        with self.reaching(f"remove {name}"):
            self.fs.rm_file(self.key(name))

"""A version's files checked against the sha256 its ``metadata.json`` records, and a store's
versions copied into the local cache (:mod:`shapcore.registry` decides when; this module how).

A record is ``{"sha256": ..., "bytes": ...}`` per file name, under the metadata's ``files``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shapcore.errors import UserError
from shapcore.store import Store, sha256_file

log = logging.getLogger(__name__)

METADATA = "metadata.json"


def refuse_if_differs(version: str, path: Path, record: dict[str, Any], *, where: str) -> None:
    """UserError naming the file, both hashes and sizes when ``path`` is not what ``record`` says."""
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise UserError(
            f"version {version}: {path.name} is corrupt: its sha256 {digest[:16]}... is not the "
            f"{record['sha256'][:16]}... recorded in its metadata.json ({where}, {path.stat().st_size} bytes, "
            f"{record['bytes']} recorded); refusing to load it"
        )


def cached_complete(folder: Path, core: tuple[str, ...]) -> dict[str, Any] | None:
    """The metadata of the version cached in ``folder`` when it records checksums and every
    ``core`` file it records is there and intact; None otherwise."""
    try:
        meta = json.loads((folder / METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    files = meta.get("files")
    if not files:
        return None
    for name, record in files.items():
        path = folder / name
        if name in core and not (path.is_file() and sha256_file(path) == record["sha256"]):
            return None
    return meta


def fetch_checked(store: Store, version: str, meta: dict[str, Any], folder: Path, core: tuple[str, ...]) -> None:
    """Fill ``folder`` with ``version``'s files from ``store``, each fetched only where absent or
    different from ``meta['files']``. A ``core`` file that does not match once fetched is refused
    (UserError); another one (a plot, the report, the explainer) is left out with a warning."""
    recorded: dict[str, dict[str, Any]] | None = meta.get("files")
    if recorded is None:  # written before checksums were recorded: everything, unchecked
        for name in store.glob(f"{version}/*"):
            store.download(name, folder / name.split("/", 1)[1])
        recorded = {}
    for name, record in recorded.items():
        dest = folder / name
        if dest.is_file() and sha256_file(dest) == record["sha256"]:
            continue  # cached and intact
        store.download(f"{version}/{name}", dest)
        try:
            refuse_if_differs(version, dest, record, where=f"{store.url}/{version}/{name}")
        except UserError as exc:
            dest.unlink(missing_ok=True)
            if name in core:
                raise
            log.warning("%s (left out)", exc)
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n")

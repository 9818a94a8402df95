"""The registry's checksums and its S3 backend (shapcore/registry.py, shapcore/store.py), in process.

Against a real S3 server: the session's SeaweedFS (tests/support/seaweed.py). The served and
explained paths over it (uvicorn, RQ workers, hot swap, the store going away mid-run) are in
tests/e2e/test_s3_registry.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shapcore.errors import UserError
from shapcore.exports import CACHE_SUBDIR
from shapcore.registry import CORE_FILES, METADATA, WEIGHTS, Registry, new_version_id
from shapcore.store import StoreUnavailable, atomic_target, sha256_file, write_file_atomic
from tests.support.processes import free_port
from tests.support.seaweed import Seaweed


def _flip(path: Path, offset: int = -4096) -> None:
    """Flip one bit, by default inside a safetensors file's tensor data (past its JSON header)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def s3_version(
    seaweed: Seaweed, smoke_model: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str]:
    """The smoke version published (again, under a new id) into a fresh S3 registry and promoted:
    (registry URL, version)."""
    src = Registry(smoke_model[0])
    loaded = src.load(smoke_model[1])
    url = seaweed.new_registry_url()
    with seaweed.environment():
        registry = Registry(url, cache=tmp_path_factory.mktemp("s3-writer-cache"))
        version = new_version_id()
        registry.publish(version, loaded.model.net, loaded.metadata, loaded.background(), src.history(loaded.version))
        registry.promote(version)
    return url, version


def test_a_file_is_replaced_whole_readable_by_others_or_not_at_all(tmp_path: Path) -> None:
    """The one atomic writer (metadata, explainer, exports, report): a failed writer leaves the old
    file and no temporary beside it; a finished one is readable by a replica running as another user."""
    path = tmp_path / "metadata.json"
    write_file_atomic(path, b"old")
    with pytest.raises(RuntimeError), atomic_target(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]
    write_file_atomic(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o644


def test_every_file_sha256_is_recorded_and_a_flipped_byte_refused_in_a_folder(smoke_model, tmp_path):
    src, version = smoke_model
    dest = tmp_path / "registry"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".runs", ".incoming"))
    registry = Registry(dest)
    files = registry.metadata(version)["files"]
    # the runtime gate's exports (shapcore/exports.py) are derived and checked by their own records
    on_disk = {p.name for p in (dest / version).iterdir()} - {METADATA, CACHE_SUBDIR}
    assert set(files) == on_disk
    for name, record in files.items():
        assert record == {"sha256": sha256_file(dest / version / name), "bytes": (dest / version / name).stat().st_size}
    registry.load(version)  # intact: loads

    _flip(dest / version / WEIGHTS)
    with pytest.raises(UserError, match=r"model\.safetensors is corrupt: its sha256 .* refusing to load it"):
        registry.load(version)


def test_publish_promote_and_load_through_s3_with_a_local_cache(s3_env, s3_version, tmp_path):
    url, version = s3_version
    registry = Registry(url, cache=tmp_path / "cache")
    assert registry.versions() == [version]
    assert registry.promoted() == version
    assert registry.root == url

    loaded = registry.load()  # cold: fetched into the cache, checked
    assert loaded.version == version
    assert loaded.path == registry.local_dir(version)
    assert loaded.path.is_relative_to(tmp_path / "cache")
    recorded = loaded.metadata["files"]
    for name in recorded:
        assert sha256_file(loaded.path / name) == recorded[name]["sha256"]
    assert set(CORE_FILES) & set(recorded) == {n for n in CORE_FILES if n in recorded}
    assert loaded.background().shape[1:] == (3, 32, 32)

    weights = loaded.path / WEIGHTS
    stamp = weights.stat().st_mtime_ns
    registry.load(version)  # cached: nothing fetched again
    assert weights.stat().st_mtime_ns == stamp

    _flip(weights)  # a cached copy gone bad is fetched again, not served
    assert registry.load(version).version == version
    assert sha256_file(weights) == recorded[WEIGHTS]["sha256"]


def test_a_flipped_byte_in_the_store_is_refused(s3_env: Seaweed, s3_version, tmp_path):
    url, version = s3_version
    registry = Registry(url, cache=tmp_path / "cache")
    # the metadata's record of the background, flipped in the store
    s3_env.flip_byte(url, f"{version}/background.safetensors")
    try:
        with pytest.raises(UserError, match=rf"background\.safetensors is corrupt: .*{url}/{version}/background"):
            registry.load(version)
        assert not (registry.local_dir(version) / "background.safetensors").exists()
    finally:
        s3_env.flip_byte(url, f"{version}/background.safetensors")  # back as it was
    assert registry.load(version).version == version


def test_an_unreachable_store_is_a_clear_error(s3_env, s3_version, monkeypatch, tmp_path):
    url, _ = s3_version
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    registry = Registry(url, cache=tmp_path / "cache")
    with pytest.raises(StoreUnavailable, match=rf"registry {url}: cannot read PROMOTED: .*Could not connect"):
        registry.resolve()
    with pytest.raises(UserError, match=rf"registry {url} is not writable"):
        registry.check_writable()

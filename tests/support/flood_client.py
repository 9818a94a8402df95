"""A flood of clients that ignore ``Retry-After`` (no tests here): ``flood(url, body, ...)``.

Each of ``connections`` keep-alive connections sends ``POST /predict`` again as soon as its last
answer is in, refusal or not, like wrk or a crowd of retrying users, until ``seconds`` have
passed or ``max_requests`` have been sent in all. Raw asyncio streams over loopback with one
prepared request: an HTTP client library would spend more CPU than the server it floods
(BENCHMARKS, issue 15: httpx took a whole core at 64 clients), and on a small machine the
client's CPU is taken from the server under test.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from urllib.parse import urlsplit

BOUNDARY = "floodclientboundary"


def predict_request(host: str, image: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one ``POST /predict`` with ``image`` as the multipart field ``file``."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="image.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode()
    return head + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server keeps the connection open) of one answer, its body consumed."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, keep = 0, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and "close" in value.lower():
            keep = False
    await reader.readexactly(length)
    return status, keep


async def _client(host: str, port: int, request: bytes, deadline: float, budget: list[int], out: Counter) -> None:
    reader = writer = None
    try:
        while time.monotonic() < deadline and budget[0] > 0:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            budget[0] -= 1
            writer.write(request)
            try:
                status, keep = await asyncio.wait_for(_read_answer(reader), max(0.1, deadline + 30 - time.monotonic()))
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                out[type(exc).__name__] += 1
                keep = False
            else:
                out[status] += 1
            if not keep:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def flood_async(
    url: str, image: bytes, connections: int, seconds: float, max_requests: int, headers: dict[str, str] | None = None
) -> Counter:
    """Statuses (and exception names) of every answer the flood got; ``headers`` go with every request."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    assert host in ("127.0.0.1", "localhost", "::1"), "the flood stays on loopback"
    request = predict_request(host, image, headers)
    out: Counter = Counter()
    budget = [max_requests]
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(_client(host, port, request, deadline, budget, out) for _ in range(connections)))
    return out


def flood(url: str, image: bytes, *, connections: int, seconds: float, max_requests: int = 200_000) -> Counter:
    """:func:`flood_async` on a fresh event loop (uvloop when installed: less client CPU)."""
    try:
        import uvloop

        return uvloop.run(flood_async(url, image, connections, seconds, max_requests))
    except ImportError:
        return asyncio.run(flood_async(url, image, connections, seconds, max_requests))

"""A real S3 API on loopback for the storage tests: moto's server mode (`moto[server]`), and a
fault-injecting HTTP proxy in front of it. Every test that uses them takes the `s3` fixture.

Credentials are test-only values passed as storage options (never the environment of the
machine); SECRET is the secret key, so tests can check it appears in no output or log.
"""

import asyncio
import logging
import random
import threading
from dataclasses import dataclass, field

import pytest

SECRET = "moto-secret-key-must-never-be-written"
FAULTS = ("drop", "slowdown", "delay")


@dataclass
class S3Endpoint:
    url: str
    options: dict = field(default_factory=dict)

    def filesystem(self):
        """A fresh s3fs client of this endpoint (its own listing cache, none shared with dr-gen's)."""
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)

    def bucket(self, name: str) -> str:
        """A new empty bucket; returns its s3:// URL."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1, a free port, for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    yield S3Endpoint(url, {"endpoint_url": url, "key": "moto-test-key", "secret": SECRET})
    server.stop()


def s3_upload(endpoint: S3Endpoint, local_files, prefix: str) -> list[str]:
    """Copy local files under s3://prefix/; returns their URLs in order."""
    fs = endpoint.filesystem()
    urls = []
    for path in local_files:
        name = str(path).rsplit("/", 1)[-1]
        fs.put_file(str(path), f"{prefix}/{name}")
        urls.append(f"s3://{prefix}/{name}")
    return urls


class FaultyProxy:
    """An HTTP reverse proxy on 127.0.0.1 in front of an S3 endpoint that, for a set share of
    requests chosen by a seeded generator, drops the connection before forwarding, answers
    503 SlowDown, or holds the answer `delay_seconds` (longer than the client's read timeout).
    Counts what it did in `injected`."""

    def __init__(self, target: str, share: float, seed: int, delay_seconds: float):
        self.target = target
        self.share = share
        self.delay_seconds = delay_seconds
        self.rng = random.Random(seed)
        self.injected = {fault: 0 for fault in FAULTS}
        self.requests = 0
        self.enabled = True
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _fault(self) -> str | None:
        self.requests += 1
        if not self.enabled or self.rng.random() >= self.share:
            return None
        fault = self.rng.choice(FAULTS)
        self.injected[fault] += 1
        return fault

    async def _handle(self, request):
        from aiohttp import web
        from yarl import URL

        fault = self._fault()
        body = await request.read()
        if fault == "drop":
            request.transport.abort()
            return web.Response(status=500)
        if fault == "slowdown":
            return web.Response(
                status=503, content_type="application/xml",
                text="<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        upstream_url = URL(self.target + request.raw_path, encoded=True)
        async with self._session.request(request.method, upstream_url, headers=headers, data=body) as upstream:
            payload = await upstream.read()
            status = upstream.status
            hop_by_hop = ("transfer-encoding", "content-encoding", "connection", "date", "server")
            if request.method != "HEAD":  # a HEAD answer's length is the object's, not its (empty) body's
                hop_by_hop += ("content-length",)
            answer_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in hop_by_hop}
        if fault == "delay":
            await asyncio.sleep(self.delay_seconds)
        if request.method == "HEAD":
            return web.Response(status=status, headers=answer_headers)
        return web.Response(status=status, headers=answer_headers, body=payload)

    def _serve(self) -> None:
        from aiohttp import ClientSession, web

        asyncio.set_event_loop(self._loop)

        async def start():
            self._session = ClientSession(auto_decompress=False)
            app = web.Application(client_max_size=1024**3)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"

        self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> "FaultyProxy":
        logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
        self._thread.start()
        self._started.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

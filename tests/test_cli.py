"""``whipcast dev`` starts everything, embedded Apache Kafka included, in one command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp
from whipcast.gateway import broker
from whipcast.gateway.settings import Settings

from .conftest import free_port


async def test_dev_starts_and_becomes_ready():
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "whipcast.signaling.cli", "dev", "--host", "127.0.0.1",
        "--port", str(port), "--publish-token", "t0ken", "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        status = None
        async with aiohttp.ClientSession() as http:
            for _ in range(360):  # the broker takes seconds to start, more on a busy machine
                if process.returncode is not None:
                    break
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        status = response.status
                        body = await response.json()
                        if status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.25)
            assert status == 200, "whipcast dev never became ready"
            # Its broker is announced for tap, push and single roles on this machine.
            settings = Settings.from_env()
            bootstrap = broker.announced_bootstrap(settings)
            assert bootstrap is not None and bootstrap.startswith("127.0.0.1:")
            assert set(body["roles"]) == {"ingest", "egress", "signaling", "thumbnails", "hls"}
            async with http.get(f"http://127.0.0.1:{port}/watch/x") as response:
                assert response.status == 200 and "text/html" in response.content_type
            async with http.post(
                f"http://127.0.0.1:{port}/whip/x",
                data="v=0",
                headers={"Content-Type": "application/sdp"},
            ) as response:
                assert response.status == 401, "--publish-token guards publishing"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()[-2000:]
    assert broker.announced_bootstrap(settings) is None, "withdrawn when dev stops"
    log = output.decode()
    assert "t0ken" not in log, "the token must not be logged"
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any("embedded Kafka at 127.0.0.1:" in e["message"] for e in entries)
    assert all(e["node"] and e["level"] and e["time"] for e in entries)

"""The service in this process (uvicorn + FastStream), for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn

from service.runtime.app import create_app
from service.runtime.settings import Settings


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[str]:
    """Serve the app until the block ends; yields its base URL once /healthz answers."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.http_port, lifespan="on", log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if task.done():
                    task.result()
                    raise RuntimeError("service stopped during start-up")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{base}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError("service did not answer /healthz")
        yield base
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)

"""The floor of the chosen stack: FastAPI with one route on uvicorn, nothing else.

`python -m bench.minimal_app` serves it with the uvicorn options `python -m app` uses (see
app/__main__.py; copied, not imported, so that importing the service's settings does not count
against the floor). Its cold start and memory are what any FastAPI service pays before doing
anything; the service is judged against them.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import uvicorn
from fastapi import FastAPI
from starlette.responses import PlainTextResponse

app = FastAPI()


@app.get("/datetime")
async def get_datetime(requester: str = "anonymous") -> PlainTextResponse:
    now = datetime.now(UTC)
    return PlainTextResponse(
        f"Hello {requester}! Today is {now:%A, %d %B %Y} and the time is {now:%H:%M:%S} UTC.\n"
    )


def main() -> None:
    uvicorn.run(
        "bench.minimal_app:app",
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8080")),
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=8,
        h11_max_incomplete_event_size=64 * 1024,
    )


if __name__ == "__main__":
    main()

"""`python -m app`: serve on HOST:PORT the way Cloud Run expects.

Access logs are off (Cloud Run logs every request itself). On SIGTERM uvicorn stops accepting,
lets in-flight requests finish for up to 8 s (Cloud Run sends SIGKILL 10 s after SIGTERM), then
runs the lifespan shutdown that closes the store and the HTTP sessions.
"""

from __future__ import annotations

import uvicorn

from app.config import load_settings
from app.logs import configure_logging

GRACEFUL_SHUTDOWN_SECONDS = 8


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging configured above
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=15,  # idle connections are closed; Cloud Run's front end reconnects
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        h11_max_incomplete_event_size=64 * 1024,
    )


if __name__ == "__main__":
    main()

"""Request bodies read with a limit, refused before they are read whole."""

from __future__ import annotations

import asyncio

from fastapi import Request

from app.api.errors import BadRequest, RequestTimeout, RequestTooLarge
from app.config import MAX_EVENT_BYTES

BODY_TIMEOUT_SECONDS = 30.0


async def read_body(request: Request, limit: int = MAX_EVENT_BYTES) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit`, before it is whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length must be a decimal number")
        if int(declared) > limit:
            raise RequestTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        # A client that trickles its body must not hold a request open indefinitely.
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(BODY_TIMEOUT_SECONDS) from None
    return b"".join(chunks)

"""Request bodies read with a limit, refused before they are read whole."""

from __future__ import annotations

from fastapi import Request

from app.api.errors import BadRequest, RequestTooLarge
from app.config import MAX_EVENT_BYTES


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
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)

"""/outbox: the emails the outbox notifier wrote, in the browser (app/outbox_view).

Mounted only when app/outbox_view.enabled says so (NOTIFIER=outbox, EVENT_AUTH=none); otherwise
every /outbox path is the same 404 as any unknown path. Plain Starlette routes (left out of the
OpenAPI document, which describes the service, not this local tool). Every page sends a strict
CSP (no inline script or style, no frames of it elsewhere) and no Referer; a message's HTML part
is served on its own URL under a CSP sandbox without scripts, forms or same-origin, framed by the
message page. Reading and parsing files happens in a worker thread.

Changes (DELETE, and the POST forms that work without JavaScript) are refused when the browser
says the request comes from another site (Sec-Fetch-Site, Origin): a page elsewhere must not
empty the outbox of whoever has it open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

if TYPE_CHECKING:
    from app.outbox_view.feed import OutboxFeed
    from app.outbox_view.mailbox import Mailbox

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
EMAIL_CSP = (
    "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
    "style-src 'unsafe-inline'; img-src data:"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
EMAIL_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": EMAIL_CSP}
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # `none`: typed or bookmarked by the user


def _mailbox(request: Request) -> Mailbox:
    from app.outbox_view.mailbox import Mailbox

    mailbox: Mailbox | None = getattr(request.app.state, "outbox_mailbox", None)
    if mailbox is None:
        mailbox = request.app.state.outbox_mailbox = Mailbox(request.app.state.outbox_dir)
    return mailbox


def _feed(request: Request) -> OutboxFeed:
    feed: OutboxFeed = request.app.state.outbox_feed
    return feed


def _not_found() -> HTTPException:
    return HTTPException(404)  # the router's own 404 for unknown paths: nothing more is said


async def list_page(request: Request) -> Response:
    from app.outbox_view.pages import render

    query = request.query_params.get("q", "").strip()[:200]
    listing = await asyncio.to_thread(_mailbox(request).listing, query)
    page = render("list.html", listing=listing, query=query)
    return HTMLResponse(page, headers=PAGE_HEADERS)


async def list_api(request: Request) -> Response:
    query = request.query_params.get("q", "").strip()[:200]
    listing = await asyncio.to_thread(_mailbox(request).listing, query)
    return JSONResponse(
        {
            "messages": [summary.as_json() for summary in listing.summaries],
            "total": listing.total,
        },
        headers=PAGE_HEADERS,
    )


async def message_page(request: Request) -> Response:
    from app.outbox_view.pages import render

    message = await asyncio.to_thread(_mailbox(request).message, request.path_params["id"])
    if message is None:
        raise _not_found()
    return HTMLResponse(render("message.html", message=message), headers=PAGE_HEADERS)


async def message_html(request: Request) -> Response:
    from app.outbox_view.pages import framed_html

    message = await asyncio.to_thread(_mailbox(request).message, request.path_params["id"])
    if message is None:
        raise _not_found()
    return HTMLResponse(framed_html(message.html, message.text), headers=EMAIL_HEADERS)


async def message_raw(request: Request) -> Response:
    message_id = request.path_params["id"]
    data = await asyncio.to_thread(_mailbox(request).raw, message_id)
    if data is None:
        raise _not_found()
    headers = {
        **PAGE_HEADERS,
        "Content-Disposition": f'attachment; filename="{message_id}.eml"',  # [0-9a-fTZ-] only
    }
    return Response(data, media_type="message/rfc822", headers=headers)


async def static(request: Request) -> Response:
    from app.outbox_view.pages import STATIC, static_file

    name = request.path_params["name"]
    media_type = STATIC.get(name)
    if media_type is None:
        raise _not_found()
    return Response(static_file(name), media_type=media_type, headers=PAGE_HEADERS)


async def events(request: Request) -> Response:
    feed = _feed(request)
    subscription = feed.subscribe()

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in subscription.stream():
                yield chunk
        finally:  # the client went, the stream was dropped, or the server is stopping
            feed.unsubscribe(subscription)

    headers = {**PAGE_HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _refuse_cross_site(request: Request) -> None:
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in SAME_ORIGIN_FETCH:
        raise HTTPException(403, "changes to the outbox are accepted from its own pages only")
    origin = request.headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.netloc != request.headers.get("host") or parts.scheme not in ("http", "https"):
            raise HTTPException(403, "changes to the outbox are accepted from its own pages only")


async def _delete_one(request: Request) -> None:
    _refuse_cross_site(request)
    message_id = request.path_params["id"]
    if not await asyncio.to_thread(_mailbox(request).delete, message_id):
        raise _not_found()
    _feed(request).deleted([message_id])


async def _delete_all(request: Request) -> None:
    _refuse_cross_site(request)
    removed = await asyncio.to_thread(_mailbox(request).delete_all)
    _feed(request).deleted(removed)


async def delete_one(request: Request) -> Response:
    await _delete_one(request)
    return Response(status_code=204, headers=PAGE_HEADERS)


async def delete_all(request: Request) -> Response:
    await _delete_all(request)
    return Response(status_code=204, headers=PAGE_HEADERS)


async def delete_one_form(request: Request) -> Response:
    await _delete_one(request)
    return RedirectResponse("/outbox", status_code=303, headers=PAGE_HEADERS)


async def delete_all_form(request: Request) -> Response:
    await _delete_all(request)
    return RedirectResponse("/outbox", status_code=303, headers=PAGE_HEADERS)


async def to_list(_: Request) -> Response:
    return RedirectResponse("/outbox", status_code=307, headers=PAGE_HEADERS)


async def not_found(_: Request) -> Response:
    raise _not_found()


# Fixed paths before `{id}` ones; `{id}.eml` before `{id}` (which would take `ID.eml` whole and
# answer 404, as it does for any other suffix). Anything else under /outbox/ is 404, whatever the
# method: not a 405, and not the router's redirect of a trailing slash (`ID%2F`) either.
routes = [
    Route("/outbox", list_page, methods=["GET"], name="outbox"),
    Route("/outbox", delete_all, methods=["DELETE"], name="outbox_delete_all"),
    Route("/outbox/delete", delete_all_form, methods=["POST"], name="outbox_delete_all_form"),
    Route("/outbox/events", events, methods=["GET"], name="outbox_events"),
    Route("/outbox/api/messages", list_api, methods=["GET"], name="outbox_messages"),
    Route("/outbox/static/{name}", static, methods=["GET"], name="outbox_static"),
    Route("/outbox/{id}.eml", message_raw, methods=["GET"], name="outbox_eml"),
    Route("/outbox/{id}/raw", message_raw, methods=["GET"], name="outbox_raw"),
    Route("/outbox/{id}/html", message_html, methods=["GET"], name="outbox_html"),
    Route("/outbox/{id}/delete", delete_one_form, methods=["POST"], name="outbox_delete_form"),
    Route("/outbox/{id}", message_page, methods=["GET"], name="outbox_message"),
    Route("/outbox/{id}", delete_one, methods=["DELETE"], name="outbox_delete"),
    Route("/outbox/", to_list, methods=["GET"], name="outbox_slash"),
    Route("/outbox/{rest:path}", not_found, methods=ANY_METHOD, name="outbox_not_found"),
]

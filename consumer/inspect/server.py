"""The console's HTTP side (aiohttp): one page, its static files, a server-sent event stream, the charts' JSON and
the thumbnails, behind a strict Content-Security-Policy and, when configured, a token.

    GET /              the page (static/index.html)            GET /static/<file>   its script and style
    GET /api/stream    text/event-stream: `snapshot` (the newest cards, newest first), then `cards` batches
    GET /api/charts    ?window=S: the charts' buckets           GET /thumb/<id>      the card's image, small JPEG

Server-sent events rather than a WebSocket: the feed only flows one way, SSE is a plain GET (the same cookie, the
same CSP `connect-src 'self'`, through any proxy), and the browser reconnects by itself.

The token (`MMSENT_INSPECT_TOKEN`): `?token=` on any URL sets an HttpOnly, SameSite=Strict cookie and redirects to
the URL without it; afterwards the cookie or `Authorization: Bearer <token>` is checked on every request, in
constant time. Without a token the console binds loopback only (`check_bind`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from consumer.inspect.feed import Feed
from consumer.inspect.thumbs import Thumbnails

CSP = ("default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
COOKIE = "mmsent_inspect"
STATIC = {  # name -> content type: only these files are served
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEARTBEAT_S = 15.0
MAX_WINDOW_S = 6 * 3600

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UnsafeBind(ValueError):
    """Binding anything but loopback without a token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not token and not is_loopback(host):
        raise UnsafeBind(f"mmsent inspect binds {host!r}, which is not loopback: set MMSENT_INSPECT_TOKEN so that "
                         "every request must carry it")


def _static(name: str) -> bytes:
    return resources.files("consumer.inspect").joinpath("static", name).read_bytes()


def _presented(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE)


def _same(presented: str | None, token: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


def token_middleware(token: str) -> Any:
    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        offered = request.query.get("token")
        if offered is not None:
            if not _same(offered, token):
                raise web.HTTPUnauthorized(text="wrong token\n")
            # The token leaves the URL (history, logs, Referer) for a cookie the page's script cannot read.
            kept = request.rel_url.query.copy()
            kept.popall("token")
            response = web.HTTPSeeOther(str(request.rel_url.with_query(kept)))
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                                secure=request.secure)
            raise response
        if not _same(_presented(request), token):
            raise web.HTTPUnauthorized(text="this console needs its token: open it with ?token=...\n")
        return await handler(request)

    return require_token


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


def build_app(feed: Feed, thumbnails: Thumbnails, token: str | None) -> web.Application:
    middlewares = [security_headers] + ([token_middleware(token)] if token else [])
    app = web.Application(middlewares=middlewares)
    files = {name: _static(name) for name in STATIC}

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=files["index.html"], content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return web.Response(body=files[name], headers={"Content-Type": STATIC[name], "Cache-Control": "no-cache"})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue = feed.subscribe()
        try:
            await response.write(_sse("snapshot", feed.snapshot()))
            while True:
                try:
                    batch = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                await response.write(_sse("cards", batch))
        except ConnectionResetError:
            pass  # the page went away (a disconnect while idle cancels the handler instead)
        finally:
            feed.unsubscribe(queue)
        return response

    async def charts(request: web.Request) -> web.Response:
        try:
            window = min(MAX_WINDOW_S, max(60, int(request.query.get("window", "900"))))
        except ValueError:
            raise web.HTTPBadRequest(text="window: seconds\n") from None
        body = {**feed.charts.series(window), "sampled_out": feed.sampled_out, "dropped_batches": feed.dropped_batches}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def thumb(request: web.Request) -> web.Response:
        card = feed.card(request.match_info["card_id"])
        url = card.get("image_url") if card else None
        jpeg = await thumbnails.get(url) if url else None
        if jpeg is None:
            raise web.HTTPNotFound()
        return web.Response(body=jpeg, headers={"Content-Type": "image/jpeg", "Cache-Control": "private, max-age=600"})

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/stream", stream)
    app.router.add_get("/api/charts", charts)
    app.router.add_get("/thumb/{card_id}", thumb)
    return app


def _sse(event: str, data: Any) -> bytes:
    # json.dumps escapes nothing a browser would run; JSON has no raw newlines, so one `data:` line suffices.
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

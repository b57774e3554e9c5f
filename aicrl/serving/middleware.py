"""ASGI middleware of the web app: body limits read as the bytes arrive, and security headers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                               "style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}

# A refused cross-origin body is read up to this much before the answer (see `drain`); past it, the
# connection is closed instead.
CROSS_ORIGIN_DRAIN_BYTES = 1 << 20


async def drain(receive, max_bytes: int) -> bool:
    """Read and drop the request body, at most `max_bytes` of it; True when it was read to its end."""
    received = 0
    while received <= max_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return False
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return received <= max_bytes
    return False


async def send_json(send, status: int, detail: str, close: bool = True) -> None:
    """Answer `{"detail": ...}` straight from the middleware (the app never sees the request)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class BodyTooLarge(HTTPException):
    def __init__(self, detail: str):
        super().__init__(413, detail)


@dataclass(frozen=True)
class BodyLimit:
    """What a POST to one path may send: a content type, and at most `max_bytes` of body."""
    max_bytes: int
    content_type: str
    wrong_type: str  # the 415 message
    too_large: str  # the 413 message


class BodyLimitMiddleware:
    """For POSTs to the paths of `limits`: refuse a body over its limit (by Content-Length before
    reading anything, and by counting bytes as they arrive for chunked bodies) or of another type."""

    def __init__(self, app, limits: dict[str, BodyLimit]):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        posted = scope["type"] == "http" and scope["method"] == "POST"
        limit = self.limits.get(scope.get("path", "")) if posted else None
        if limit is None:
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if not headers.get("content-type", "").lower().startswith(limit.content_type):
            # Read the (bounded) body first: closing on unread bytes resets the connection, and the
            # client can lose the answer before it reads it.
            drained = await drain(receive, limit.max_bytes)
            return await send_json(send, 415, limit.wrong_type, close=not drained)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit.max_bytes):
            return await send_json(send, 413, limit.too_large)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    raise BodyTooLarge(limit.too_large)  # FastAPI turns it into the 413 response
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeadersMiddleware:
    """Security headers on every answer; POSTs and DELETEs from another site's pages refused (403)."""

    def __init__(self, app, same_origin_posts: bool = True):
        self.app, self.same_origin_posts = app, same_origin_posts
        self._headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.same_origin_posts and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            # A page on another site (or a DNS-rebound name) must not post to this server.
            headers = _headers(scope)
            origin, host = headers.get("origin"), headers.get("host", "")
            if origin and origin != "null" and urlsplit(origin).netloc != host:
                drained = await drain(receive, CROSS_ORIGIN_DRAIN_BYTES)
                return await send_json(send, 403, "Cross-origin requests are not allowed.", close=not drained)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in self._headers if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)

"""The web app's guard (ASGI middleware): who may talk to the server, how much they may send,
the security headers of every answer, and errors as short JSON."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

# Requests other than uploads carry a few hundred bytes of JSON.
MAX_JSON_BYTES = 64 * 1024
UPLOAD_PATH = "/api/upload"

# The page, its script and its style come from this server only; images are data URLs; the
# page may talk to this server only and may not be framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
DEFAULT_PORTS = {"http": 80, "https": 443}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _origin(scheme: str, netloc: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a URL's network location, the port made explicit; None when malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return scheme, parts.hostname, port if port is not None else DEFAULT_PORTS.get(scheme)


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: only this server's own Host, only its own origin (scheme, host and
    port: a page on another port of the same machine is another site), bodies within their
    size limit (counted while they arrive, whatever the headers say), the security headers on
    every answer, and any unexpected exception answered as a short JSON error, logged here with
    its traceback."""

    def __init__(self, app, allowed_hosts: set[str], max_upload_bytes: int):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.max_upload_bytes = max_upload_bytes

    def refusal(self, scope, headers: dict[str, str]) -> str | None:
        """Why the request must be refused (Host, Origin), or None."""
        own = _origin(scope.get("scheme", "http"), headers.get("host", ""))
        if own is None or own[1] not in self.allowed_hosts:
            return "requests must address this server as localhost"
        origin = headers.get("origin")
        if origin is not None:  # browsers send it on cross-site and on all POST requests
            parts = urlsplit(origin)
            # "null" (sandboxed pages, file://) has no host and is refused too.
            if _origin(parts.scheme, parts.netloc) != own:
                return "requests from other web sites are refused"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        started = False
        refused_body = False  # the guard answered 413 itself; the app's own answer is dropped

        async def secured_send(message):
            nonlocal started
            if refused_body:
                return
            if message["type"] == "http.response.start":
                started = True
                names = {k.decode("latin-1").lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refused = self.refusal(scope, headers)
        if refused:
            return await error(403, refused)(scope, receive, secured_send)
        upload = scope["path"] == UPLOAD_PATH
        # Multipart framing adds a few hundred bytes to the file itself.
        limit = self.max_upload_bytes + MAX_JSON_BYTES if upload else MAX_JSON_BYTES
        too_large = error(
            413,
            f"the upload is larger than the {self.max_upload_bytes / 2**20:g} MB limit"
            if upload
            else "the request is too large",
        )
        if headers.get("content-length", "").isdigit() and int(headers["content-length"]) > limit:
            return await too_large(scope, receive, secured_send)
        received = 0

        async def counted_receive():
            nonlocal received, refused_body
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Answer here rather than where BodyTooLarge ends up: FastAPI turns any error
                # while reading a request body (a chunked one, with no Content-Length to refuse
                # it by) into its own "400 There was an error parsing the body".
                if not started:
                    await too_large(scope, receive, secured_send)
                    refused_body = True
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted_receive, secured_send)
        except BodyTooLarge:
            # Answered with 413 in counted_receive, unless the app had already begun its answer:
            # then that answer is cut short, which the server's log should say.
            if not refused_body:
                logger.warning(
                    "%s %s: the request body passed the %d-byte limit after the answer had begun; "
                    "the answer was cut short",
                    scope.get("method"),
                    scope["path"],
                    limit,
                )
        except Exception:
            if refused_body:
                return  # the app's failure to read the body it was refused
            logger.exception("unexpected error serving %s %s", scope.get("method"), scope["path"])
            if not started:
                message = "unexpected server error; the details are in the server's log"
                await error(500, message)(scope, receive, secured_send)

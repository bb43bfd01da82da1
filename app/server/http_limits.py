"""HTTP/1.1 limits below the application: header size and the time to send headers.

uvicorn's httptools protocol buffers a request's headers without bound and waits for
them forever: a 32 MiB header was answered, four connections each holding an
unfinished 24 MiB header held 126 MB, and a request left incomplete for 40 s was
still served. ``limited_protocol`` is that protocol with two bounds, which no ASGI
middleware can set (it only runs once the headers are complete):

- a request whose headers (request line included) exceed ``max_header_bytes`` gets
  ``431`` and the connection is closed, as soon as that many bytes arrived;
- a connection that does not complete a request's headers within
  ``header_timeout_s`` (from connecting, or from the first byte of a request) gets
  ``408`` and is closed.

Concurrency is bounded by uvicorn itself (``limit_concurrency``: ``503`` beyond it).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _plain(status: int, reason: str) -> bytes:
    body = (f'{{"error": {{"code": "{reason.lower().replace(" ", "_")}", '
            f'"message": "{reason}"}}}}').encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def limited_protocol(max_header_bytes: int, header_timeout_s: float) -> type:
    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_bytes = 0
            self._in_headers = True
            self._began = False
            self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
                header_timeout_s, self._too_slow)

        def connection_lost(self, exc) -> None:
            self._cancel_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # still inside a request's headers after this chunk (at most one read's
            # worth is ever buffered past the bound: the transport reads in chunks)
            if self._in_headers and not self.transport.is_closing():
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(431, "Request Header Fields Too Large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:  # the next request on a kept-alive connection
                self._in_headers = True
                self._header_bytes = 0
                self._cancel_timer()
                self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)
            self._began = True

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._cancel_timer()
            super().on_headers_complete()

        def _cancel_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self._in_headers and not self.transport.is_closing():
                if self._began:  # a request began: tell it why
                    self._refuse(408, "Request Timeout")
                else:  # an idle connection that never sent anything
                    self.transport.close()

        def _refuse(self, status: int, reason: str) -> None:
            self._in_headers = False
            self._cancel_timer()
            if not self.transport.is_closing():
                self.transport.write(_plain(status, reason))
                self.transport.close()

    return LimitedHttpToolsProtocol


def __getattr__(name: str) -> type:
    """``app.server.http_limits:FROM_SETTINGS``: the limited protocol with this
    process's settings (the environment). uvicorn imports the protocol of each worker
    of ``recsvc serve --workers N`` by name in that worker, and a class made by
    ``limited_protocol`` cannot be passed to it by pickling."""
    if name == "FROM_SETTINGS":
        from app.settings import Settings

        settings = Settings()
        return limited_protocol(settings.max_header_bytes, settings.header_timeout_s)
    raise AttributeError(name)

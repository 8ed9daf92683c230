"""Connection-level limits of `rft serve`: what uvicorn is told, and the little it cannot be told.

    uvicorn.Server(uvicorn_config(app, cfg, host=cfg.host, port=cfg.port)).run()

A request body is checked by the app (size, JSON, fields), but a client can hold the server without ever
sending one: open thousands of connections, or send headers one byte a minute (slowloris). uvicorn bounds
idle keep-alive connections (`timeout_keep_alive`) and the size of a header block
(`h11_max_incomplete_event_size`), but it has no deadline for a request's headers, and its own connection
limit (`limit_concurrency`) answers 503 without `Retry-After`. `limited_protocol` adds both: a connection
beyond `max_connections` is answered 503 with `Retry-After` and closed before anything is read, and a
connection that has not completed a request's headers `header_timeout` seconds after it opened (or after its
previous answer) is closed. The app bounds the body's arrival with the same timeout (408).
"""
from __future__ import annotations

import json


def limited_protocol(max_connections: int, header_timeout: float) -> type:
    """uvicorn's h11 protocol with a connection cap and a header deadline (a class: uvicorn instantiates one
    per connection). Built on demand, so that importing this module imports no uvicorn."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            if len(self.connections) > max_connections:
                body = json.dumps({"error": {"message": f"more than {max_connections} open connections; retry "
                                                        f"later", "type": "server_overloaded"}}).encode()
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
                                b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                                b"\r\n\r\n" + body)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late, self.cycle)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self, cycle) -> None:
            self._header_timer = None
            if self.cycle is cycle and not self.transport.is_closing():     # no new request since it was armed
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:        # between requests: headers expected
                self._arm()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # a request's headers are complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return LimitedH11Protocol


def uvicorn_config(app, cfg, **kw):
    """The uvicorn.Config of `rft serve` for `cfg` (a ServeConfig); tests pass `log_level` etc. through kw."""
    import uvicorn
    options = dict(log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=5,
                   http=limited_protocol(cfg.max_connections, cfg.header_timeout),
                   h11_max_incomplete_event_size=16 << 10, backlog=min(2048, cfg.max_connections),
                   limit_concurrency=None)       # ours, with Retry-After (above); the engine queue has its own
    return uvicorn.Config(app, **(options | kw))

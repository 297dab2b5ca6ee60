"""The HTTP edge of the server: what uvicorn does not bound, and who may call it from a browser.

`guarded_protocol(...)` is uvicorn's h11 protocol with three limits it lacks. uvicorn closes an
idle keep-alive connection after `timeout_keep_alive`, but a socket that connects and never
finishes its request headers (or its body) is held forever, and a few thousand of them exhaust
the process's file descriptors. So:
  - header timeout: a request's headers must be complete within `header_timeout` seconds of the
    connection (or of its first byte, on a kept-alive connection), else the socket is closed;
  - body timeout: a request's body must be complete within `body_timeout` seconds of its headers;
  - connection cap: past `max_connections` open sockets, the one that has waited longest for its
    headers (or idles longest between requests) is closed to make room, so a flood of silent
    sockets cannot lock real clients out; if every connection is busy, the new one is closed.

`HostOriginGuard` is ASGI middleware against browsers driven by other sites. A server without a
key would otherwise obey any web page the user visits: a page cannot read a cross-origin answer
without CORS, but it can POST (a "simple" request with a text/plain body needs no preflight), and
through DNS rebinding (a name of the attacker's that resolves to 127.0.0.1) its requests even
become same-origin. Hence:
  - Host allow-list (when enabled): a request is served only if its Host is an IP address,
    `localhost` or a `*.localhost` name, or a name given with --allow-host (rebinding needs a
    name the attacker controls, so an IP literal is safe);
  - Origin check: a request that carries an Origin (browsers send one on cross-origin requests
    and on same-origin POSTs) is served only if the Origin is this server itself (the chat page)
    or one given with --allow-origin; CORS headers are sent only for those (off by default).
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Iterable, Optional
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout: float = 10.0, body_timeout: float = 60.0, max_connections: int = 512):
    """An H11Protocol subclass with these limits (uvicorn.Config(http=...) takes a class)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._phase, self._timer, self._since = None, None, time.monotonic()
            self._watch()
            if len(self.connections) > max_connections:
                self._make_room()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._since = time.monotonic()  # idle from now: first in line to be closed for room
            self._watch()

        def connection_lost(self, exc):
            self._arm(None, None)
            super().connection_lost(exc)

        def _waiting(self) -> bool:  # for headers, or idle between requests
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _watch(self):
            state = self.conn.their_state
            if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                # idle between requests: uvicorn's keep-alive timer runs; once bytes arrive, ours
                if self.timeout_keep_alive_task is None:
                    self._arm("headers", header_timeout)
            elif state is h11.SEND_BODY:
                self._arm("body", body_timeout)
            else:
                self._arm(None, None)

        def _arm(self, phase, seconds):
            if phase == self._phase:
                return  # the running deadline for this phase stands
            if self._timer is not None:
                self._timer.cancel()
            self._phase, self._timer = phase, None
            if phase is not None:
                self._timer = self.loop.call_later(seconds, self._expire)

        def _expire(self):
            self._timer = None
            if not self.transport.is_closing():
                self.logger.info("closing a connection that did not send its request %s within %.0f s",
                                 self._phase, header_timeout if self._phase == "headers" else body_timeout)
                self.transport.close()

        def _make_room(self):
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                    and c._waiting() and not c.transport.is_closing()]
            victim = min(idle, key=lambda c: c._since, default=None)
            (victim or self).transport.close()

    return GuardedH11Protocol


LOCAL_NAMES = ("localhost",)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _origin_key(url: str) -> Optional[tuple]:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port


class HostOriginGuard:
    """ASGI middleware: 403 (OpenAI's error object) for a Host not allowed (when
    `allowed_hosts` is not None) or an Origin that is neither this server nor allowed."""

    def __init__(self, app, allowed_hosts: Optional[Iterable[str]] = None, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def host_ok(self, host: Optional[str]) -> bool:
        if self.hosts is None or host is None or "*" in self.hosts:
            return True
        name = _host_name(host)
        return _is_ip(name) or name in LOCAL_NAMES or name.endswith(".localhost") or name in self.hosts

    def origin_ok(self, origin: str, host: Optional[str], scheme: str) -> bool:
        if "*" in self.origins or origin.rstrip("/").lower() in self.origins:
            return True
        own = _origin_key(f"{scheme}://{host}") if host else None
        return own is not None and _origin_key(origin) == own

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host, origin = headers.get("host"), headers.get("origin")
        why = None
        if not self.host_ok(host):
            why = (f"Host {host!r} is not allowed (this server answers localhost names and IP addresses, against "
                   "DNS rebinding); start it with --allow-host NAME to serve that name")
        elif origin is not None and not self.origin_ok(origin, host, scope.get("scheme", "http")):
            why = (f"cross-origin request from {origin!r} refused; start the server with --allow-origin {origin} "
                   "to let that site call it")
        if why is None:
            return await self.app(scope, receive, send)
        await _drain(receive)
        body = json.dumps({"error": {"message": why, "type": "permission_error", "param": None,
                                     "code": "forbidden_origin" if origin else "forbidden_host"}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive, limit: int = 1 << 20):
    """Read (and drop) a small request body, so the connection stays usable for the next request."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return

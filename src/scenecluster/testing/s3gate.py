"""A gate in front of a test S3 server: a Requester Pays bucket's refusals, and S3's latency over a network.

SeaweedFS on loopback has no Requester Pays buckets and answers in about a millisecond. This loopback HTTP proxy
forwards each request to it unchanged (the ``Host`` header included, so SigV4 signatures still verify):

* :class:`RequesterPaysGate` forwards a request only when it carries ``x-amz-request-payer: requester`` and
  answers ``403 AccessDenied`` otherwise, listings included, as S3 does; it counts both, so a test can tell that
  every request of a run accepted the charges;
* ``S3Gate(upstream, delay_s=0.05)`` holds each request for ``delay_s`` before forwarding it, as a store some
  tens of milliseconds away answers (benchmarks of what is read one request after another).
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3Gate:
    """``with S3Gate(upstream_endpoint, delay_s=...) as gate:`` then use ``gate.endpoint_url`` as the store.

    Attributes
    ----------
    paid, refused : int
        Requests forwarded and requests refused (only :class:`RequesterPaysGate` refuses any: those without
        ``x-amz-request-payer: requester``).
    """

    require_payer = False

    def __init__(self, upstream: str, *, delay_s: float = 0.0) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.delay_s = delay_s
        self.paid = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start the gate first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> S3Gate:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: the tests' output is for failures
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if gate.delay_s:
                    time.sleep(gate.delay_s)
                paid = self.headers.get("x-amz-request-payer", "").lower() == "requester"
                if gate.require_payer and not paid:
                    with gate._lock:
                        gate.refused += 1
                    self._answer(403, [("Content-Type", "application/xml")], _DENIED)
                    return
                with gate._lock:
                    gate.paid += 1
                conn = http.client.HTTPConnection(*gate.upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        conn.putheader(name, value)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                    self._answer(resp.status, headers, data)
                finally:
                    conn.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # a HEAD's length is the object's, and no body follows
                for name, value in headers:
                    if head or name.lower() != "content-length":
                        self.send_header(name, value)
                if not head or not any(name.lower() == "content-length" for name, _ in headers):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port, from the kernel
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="s3-gate", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> S3Gate:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class RequesterPaysGate(S3Gate):
    """``with RequesterPaysGate(upstream_endpoint) as gate:``: refuses, with ``403 AccessDenied``, every request that
    does not accept the charges, as S3 does for a Requester Pays bucket's non-owners."""

    require_payer = True

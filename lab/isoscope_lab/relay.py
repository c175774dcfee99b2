"""A tiny OTLP/HTTP relay: the lab's stand-in for an OpenTelemetry Collector agent in front of the daemon.

Run as ``python -m isoscope_lab.relay --listen 0.0.0.0:PORT --forward URL --pod IP=UID ...``
(the lab starts it in its own cgroup). It receives the services' spans
(``POST /v1/traces``, protobuf), tags each request's resources with the
sending pod's ``k8s.pod.uid`` — found from the connection's source address,
as the Collector's ``k8sattributes`` processor associates pods by connection
— and forwards the request to the daemon, answering the service with the
daemon's answer. The daemon then sees every span arrive from the relay's
socket and must trust it as a relay (``identity.relays``) to join the spans
with the pods they name.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

logger = logging.getLogger(__name__)

COMM = "isoscope-relay"
"""The relay's process name (``/proc/<pid>/comm``), set at start."""

POD_UID_ATTR = "k8s.pod.uid"
_PR_SET_NAME = 15


def set_comm(name: str) -> None:
    """Rename the calling thread (the main thread: the process's ``comm``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def tag_pod(request: ExportTraceServiceRequest, pod_uid: str) -> None:
    """Set ``k8s.pod.uid`` on every resource of ``request`` that does not name one."""
    for rs in request.resource_spans:
        if not any(kv.key == POD_UID_ATTR for kv in rs.resource.attributes):
            rs.resource.attributes.append(KeyValue(key=POD_UID_ATTR, value=AnyValue(string_value=pod_uid)))


class _Upstream(threading.local):
    conn: http.client.HTTPConnection | None = None


class Relay:
    """Forwarding state: the daemon's URL, the pod map, one kept-alive connection per handler thread.

    Args:
        forward: the daemon's OTLP/HTTP traces URL.
        pods: source IP → pod UID.
    """

    def __init__(self, forward: str, pods: dict[str, str]) -> None:
        self.url = urlsplit(forward)
        self.pods = dict(pods)
        self._up = _Upstream()
        self.forwarded = 0

    def forward(self, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """POST ``body`` to the daemon; returns (status, body, content type)."""
        for attempt in range(2):
            conn = self._up.conn
            if conn is None:
                conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=30)
                self._up.conn = conn
            try:
                conn.request("POST", self.url.path or "/v1/traces", body=body,
                             headers={"Content-Type": content_type})
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, data, resp.getheader("Content-Type", content_type)
            except (OSError, http.client.HTTPException):
                conn.close()
                self._up.conn = None
                if attempt == 1:
                    return 503, b"", "text/plain"
        return 503, b"", "text/plain"


def _handler_class(relay: Relay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            if self.path != "/v1/traces":
                self._answer(404, b"", "text/plain")
                return
            ctype = self.headers.get("Content-Type", "application/x-protobuf")
            uid = relay.pods.get(self.client_address[0])
            if uid and ctype.startswith("application/x-protobuf"):
                req = ExportTraceServiceRequest.FromString(body)
                tag_pod(req, uid)
                body = req.SerializeToString()
            status, data, rtype = relay.forward(body, ctype)
            if status == 200:
                relay.forwarded += 1
            self._answer(status, data, rtype)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self._answer(200 if self.path == "/healthz" else 404, b"", "text/plain")

        def _answer(self, status: int, data: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: object) -> None:
            logger.debug("relay " + fmt, *args)

    return Handler


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="isoscope_lab.relay", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="IP:PORT (port 0: any; the bound port is printed)")
    p.add_argument("--forward", required=True, help="the daemon's OTLP/HTTP traces URL")
    p.add_argument("--pod", action="append", default=[], help="IP=POD_UID (repeatable)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Relay until SIGTERM/SIGINT; prints ``listening PORT`` once bound."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [relay] %(message)s")
    args = parse_args(argv)
    set_comm(COMM)
    pods = dict(item.split("=", 1) for item in args.pod)
    relay = Relay(args.forward, pods)
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), _handler_class(relay))
    server.daemon_threads = True
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    t = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    t.start()
    print(f"listening {server.server_address[1]}", flush=True)
    stop.wait()
    server.shutdown()
    logger.info("relay forwarded %d requests", relay.forwarded)
    return 0


if __name__ == "__main__":
    sys.exit(main())

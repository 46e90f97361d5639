"""The app behind the standalone proxy in its tests: a WSGI app that reports what reached it."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading

from werkzeug.wrappers import Request, Response

from litefs_wsgi.testing import LiteFSMount

GZIP_BODY = gzip.compress(b"compress me " * 1000, mtime=0)
PATTERN = bytes(range(256)) * 256  # 64 KiB of every byte value, for downloads


class Target:
    """``requests`` lists "METHOD RAW_URI" of every request; a write moves ``app.db``'s
    position in ``mount`` by one, as a commit on a LiteFS primary would. ``/sse`` sends
    event N only once ``gates[N - 1]`` is set."""

    def __init__(self, mount: LiteFSMount | None = None) -> None:
        self.mount = mount
        self.requests: list[str] = []
        self.gates = [threading.Event() for _ in range(3)]
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        request = Request(environ)
        with self._lock:
            self.requests.append(f"{request.method} {environ.get('RAW_URI')}")
            if request.method not in ("GET", "HEAD") and self.mount is not None:
                self.mount.set_position("app.db", (self.mount.position("app.db") or 0) + 1)
        handler = getattr(self, "do_" + request.path.strip("/").replace("-", "_"), self.do_echo)
        return handler(request)(environ, start_response)

    def do_echo(self, request: Request) -> Response:
        digest, length = hashlib.sha256(), 0
        while chunk := request.stream.read(64 * 1024):
            digest.update(chunk)
            length += len(chunk)
        report = {
            "method": request.method,
            "raw_uri": request.environ.get("RAW_URI"),
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": digest.hexdigest(),
            "body_len": length,
        }
        return Response(json.dumps(report), content_type="application/json")

    def do_body(self, request: Request) -> Response:
        return Response(request.get_data(), content_type="application/octet-stream")

    def do_download(self, request: Request) -> Response:
        size = int(request.args["size"])

        def chunks():
            for start in range(0, size, len(PATTERN)):
                yield PATTERN[: min(len(PATTERN), size - start)]

        # With ?length=1 the size is sent as Content-Length (a file, say); else chunked.
        headers = {"Content-Length": str(size)} if request.args.get("length") else {}
        return Response(chunks(), content_type="application/octet-stream", headers=headers)

    def do_cookies(self, request: Request) -> Response:
        response = Response("two cookies")
        response.set_cookie("a", "1")
        response.set_cookie("b", "2", httponly=True)
        return response

    def do_session(self, request: Request) -> Response:
        response = Response(json.dumps({"cookie": request.headers.get("Cookie")}), content_type="application/json")
        if request.args.get("user"):
            response.set_cookie("session", request.args["user"])
        return response

    def do_gzip(self, request: Request) -> Response:
        return Response(GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    def do_redirect(self, request: Request) -> Response:
        return Response("", status=302, headers={"Location": "/elsewhere"})

    def do_replay(self, request: Request) -> Response:
        # What ReplayOnPrimary answers in an app that LiteFSMiddleware does not wrap.
        return Response("must run on the primary", status=503, headers={"X-LiteFS-Replay": "1"})

    def do_hop(self, request: Request) -> Response:
        # A header the target names in Connection is for the next hop only. (WSGI forbids an
        # app to set Connection; werkzeug's server sends it on, with its own "close" after
        # it. "close" comes first here too, or the proxy's client would keep the connection.)
        headers = {"Connection": "close, X-Hop-Secret", "X-Hop-Secret": "1", "X-Kept": "1"}
        return Response("hop", headers=headers)

    def do_sse(self, request: Request) -> Response:
        def events():
            for n in range(len(self.gates) + 1):
                if n and not self.gates[n - 1].wait(20):
                    return
                yield f"data: event {n}\n\n".encode()

        return Response(events(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})

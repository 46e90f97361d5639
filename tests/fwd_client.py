"""An HTTP client for the forwarding and proxy tests that sends exactly the headers given."""

from __future__ import annotations

import http.client

from litefs_wsgi.txid import parse_txid


def request(port, method, target, body=None, headers=None, chunked=False):
    """(status, headers, body) from one request on a fresh connection: http.client adds no
    header we did not ask for but Host (and Content-Length or Transfer-Encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        headers = dict(headers or {})
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        elif body is not None:
            headers["Content-Length"] = str(len(body))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def header(report: dict, name: str) -> list[str]:
    return [v for k, v in report["headers"] if k.lower() == name.lower()]


def txid_cookie(headers) -> int:
    for value in headers.get_all("Set-Cookie") or []:
        if value.startswith("__txid="):
            return parse_txid(value.split(";")[0][len("__txid=") :])
    raise AssertionError(f"no __txid cookie in {headers.get_all('Set-Cookie')}")


def chunks(data: bytes, size: int = 300 * 1024):
    for i in range(0, len(data), size):
        yield data[i : i + size]

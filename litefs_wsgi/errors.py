"""The plain-text error answers LiteFS's proxy writes (``http.Error`` in Go)."""

from __future__ import annotations

from collections.abc import Iterable

from werkzeug.http import HTTP_STATUS_CODES

NO_PRIMARY = "Proxy error: no primary available"
NOT_PRIMARY = NO_PRIMARY + ": the request was forwarded to a node that is not the primary"
TIMEOUT = "Proxy timeout"


def status_line(code: int) -> str:
    return f"{code} {HTTP_STATUS_CODES.get(code, 'Unknown')}"


def error(start_response, code: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    """Answer ``code`` with ``message`` and a newline as the body, as Go's ``http.Error`` does."""
    body = (message + "\n").encode("utf-8")
    start_response(
        status_line(code),
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
    )
    return [body]

"""The ``__txid`` cookie: read it from a request, write it on a response, optionally signed."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

from werkzeug.http import http_date, parse_cookie

from .txid import format_txid, parse_txid

COOKIE_NAME = "__txid"
_SIG_LEN = 32  # hex digits of HMAC-SHA256 kept: 128 bits


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode("ascii"), hashlib.sha256).hexdigest()[:_SIG_LEN]


def _parse(environ: Mapping):
    try:
        return parse_cookie(environ)
    except UnicodeError:
        # werkzeug raises on a header that is not UTF-8; Go skips only the bad bytes' cookie,
        # so a read must neither fail nor lose its __txid over another cookie's stray bytes.
        raw = environ.get("HTTP_COOKIE", "").encode("latin-1", "replace")
        return parse_cookie(raw.decode("utf-8", "replace").encode("utf-8").decode("latin-1"))


class TxidCookie:
    """Reads and writes the positions of ``dbs`` in the ``__txid`` cookie.

    With one database the value is LiteFS's: 16 hex digits. With several it is one such
    TXID per database, in the order of ``dbs``, joined by ``-``. With a ``secret`` the value
    is followed by ``.<expiry>.<signature>`` and anything unsigned, tampered with or expired
    reads as no cookie at all.
    """

    def __init__(self, dbs: Sequence[str], expiry: float, secret: str | None = None) -> None:
        self.dbs = tuple(dbs)
        self.expiry = expiry
        self.secret = secret.encode("utf-8") if secret else None

    def read(self, environ: Mapping) -> dict[str, int] | None:
        """The TXIDs the client must see, by database; None when there is no usable cookie
        or every TXID in it is zero (nothing to wait for)."""
        value = _parse(environ).get(COOKIE_NAME)
        if not value:
            return None
        if self.secret is not None:
            value = self._verify(value)
            if value is None:
                return None
        parts = value.split("-")
        if len(parts) != len(self.dbs):
            return None
        txids = [parse_txid(part) for part in parts]
        if None in txids or not any(txids):
            return None
        return dict(zip(self.dbs, txids))

    def _verify(self, value: str) -> str | None:
        payload, _, signature = value.rpartition(".")
        txids, _, expires = payload.rpartition(".")
        # payload must be ASCII to be signed: a cookie is latin-1 text, and "é.1.x" once raised here.
        if not txids or len(expires) > 16 or not payload.isascii() or not expires.isalnum():
            return None
        if not hmac.compare_digest(signature.encode("ascii", "replace"), _sign(self.secret, payload).encode()):
            return None
        try:
            if int(expires, 16) < time.time():
                return None
        except ValueError:
            return None
        return txids

    def header(self, txids: Mapping[str, int], secure: bool) -> str:
        """The ``Set-Cookie`` value for the positions ``txids`` (one per database)."""
        value = "-".join(format_txid(txids[db]) for db in self.dbs)
        expires = time.time() + self.expiry
        if self.secret is not None:
            payload = f"{value}.{int(expires):x}"
            value = f"{payload}.{_sign(self.secret, payload)}"
        # Go's http.Cookie order, as LiteFS writes it; then our Secure and SameSite.
        return f"{COOKIE_NAME}={value}; Path=/; Expires={http_date(expires)}; HttpOnly" + (
            "; Secure; SameSite=Lax" if secure else "; SameSite=Lax"
        )

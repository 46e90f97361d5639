"""The ``__txid`` cookie: read it from a request, write it on a response, optionally signed."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from werkzeug.http import http_date

from .txid import format_txid, parse_txid

COOKIE_NAME = "__txid"
_SIG_LEN = 32  # hex digits of HMAC-SHA256 kept: 128 bits
_PARSED_MAX = 4096  # distinct Cookie headers remembered per middleware
_UNUSABLE: tuple[None, None] = (None, None)

# Each ";"-separated part whose name, trimmed, is __txid: Go's readCookies splits on ";"
# without regard to quotes and trims spaces and tabs around the part and the name. A ","
# ends a part too: WSGI servers join a request's several Cookie lines with ",", each of
# which Go reads on its own (one line whose cookie value holds a "," then waits where Go
# would not: on the side that never serves a stale read).
_TXID_PART = re.compile(r"(?:^|[;,])[ \t]*__txid[ \t]*(?:=([^;,]*)|(?=[;,]|$))")
# Go's validCookieValueByte: printable ASCII and space, but no '"', ';' or '\\'.
_VALID_VALUE = re.compile(r"[\x20-\x21\x23-\x3a\x3c-\x5b\x5d-\x7e]*")


@functools.lru_cache(maxsize=8)
def _attributes(second: int, secure: bool) -> str:
    # Everything after the value changes once a second: formatted once a second, not once a
    # write. Go's http.Cookie order, as LiteFS writes it; then our Secure and SameSite.
    tail = "; Secure; SameSite=Lax" if secure else "; SameSite=Lax"
    return f"; Path=/; Expires={http_date(second)}; HttpOnly{tail}"


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode("ascii"), hashlib.sha256).hexdigest()[:_SIG_LEN]


def cookie_value(header: str | None) -> str | None:
    """The ``__txid`` cookie's value in a ``Cookie`` header, as Go's ``Request.Cookie`` finds
    it: the first part so named whose value is valid, surrounding double quotes removed; the
    header's lines, joined with "," by the WSGI server, read each on its own.

    werkzeug's ``parse_cookie`` is not used: it honours quotes around ``;``, trims values and
    raises on bytes that are not UTF-8, so its answer is not always Go's, and parsing every
    cookie costs more than the rest of a read. WSGI gives the header as latin-1 text, one
    character per byte, so the byte checks are Go's.
    """
    if not header or COOKIE_NAME not in header:
        return None
    for match in _TXID_PART.finditer(header):
        value = (match[1] or "").rstrip(" \t")
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if _VALID_VALUE.fullmatch(value):
            return value
    return None


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
        self._parsed: dict[str, tuple[Mapping[str, int] | None, int | None]] = {}
        self._parsed_values: dict[str, tuple[Mapping[str, int] | None, int | None]] = {}  # txid_header's
        # The last header made: a write that commits nothing (a search form, a GraphQL query)
        # sends the same one as the write before it, until the second changes.
        # With the span of time.time() it serves: the same Expires second (a float comparison
        # per write, not the int() that finds the second).
        self._last: tuple[tuple[int, ...], bool, float, float, str] = ((), False, 0.0, 0.0, "")

    def read(self, environ: Mapping) -> Mapping[str, int] | None:
        """The TXIDs the client's ``__txid`` cookie asks for, by database (a read-only
        mapping); None when there is no usable cookie or every TXID in it is zero (nothing to
        wait for)."""
        header = environ.get("HTTP_COOKIE")
        if not header or COOKIE_NAME not in header:
            return None
        # A client sends the same header again and again for the cookie's life: parse (and
        # check the signature of) each distinct header once, then only the expiry.
        parsed = self._parsed.get(header)
        if parsed is None:
            if len(self._parsed) >= _PARSED_MAX:
                self._parsed.clear()  # bounded: distinct headers from many clients, or forged ones
            parsed = self._parsed[header] = self._parse(cookie_value(header))
        targets, expires = parsed
        if expires is not None and expires < time.time():
            return None
        return targets

    def parse(self, value: str | None) -> Mapping[str, int] | None:
        """The TXIDs a ``__txid`` value asks for, checked as ``read`` checks the cookie's."""
        parsed = self._parsed_values.get(value)  # each distinct value parsed once, as in read
        if parsed is None:
            if len(self._parsed_values) >= _PARSED_MAX:
                self._parsed_values.clear()
            parsed = self._parsed_values[value] = self._parse(value)
        targets, expires = parsed
        if expires is not None and expires < time.time():
            return None
        return targets

    def _parse(self, value: str | None) -> tuple[Mapping[str, int] | None, int | None]:
        """(the TXIDs by database, the signature's expiry); (None, None) when unusable."""
        if not value:
            return _UNUSABLE
        expires = None
        if self.secret is not None:
            verified = self._verify(value)
            if verified is None:
                return _UNUSABLE
            value, expires = verified
        parts = value.split("-")
        if len(parts) != len(self.dbs):
            return _UNUSABLE
        txids = [parse_txid(part) for part in parts]
        if None in txids or not any(txids):
            return _UNUSABLE
        return MappingProxyType(dict(zip(self.dbs, txids))), expires

    def _verify(self, value: str) -> tuple[str, int] | None:
        payload, _, signature = value.rpartition(".")
        txids, _, expires = payload.rpartition(".")
        # payload must be ASCII to be signed: a cookie is latin-1 text, and "é.1.x" once raised here.
        if not txids or len(expires) > 16 or not payload.isascii() or not expires.isalnum():
            return None
        if not hmac.compare_digest(signature.encode("ascii", "replace"), _sign(self.secret, payload).encode()):
            return None
        try:
            return txids, int(expires, 16)
        except ValueError:
            return None

    def header(self, txids: Mapping[str, int], secure: bool) -> str:
        """The ``Set-Cookie`` value for the positions ``txids`` (one per database)."""
        return self.header_of(tuple([txids[db] for db in self.dbs]), secure)

    def header_of(self, txids: tuple[int, ...], secure: bool) -> str:
        """``header`` for TXIDs given in the order of ``dbs``."""
        return self.made(txids, secure)[4]

    def made(self, txids: tuple[int, ...], secure: bool) -> tuple[tuple[int, ...], bool, float, float, str]:
        """``header_of``, with what it was made for: (``txids``, ``secure``, the span of
        ``time.time()`` in which it serves, the header). A caller may keep it, to send the
        header again while the span lasts."""
        now = time.time()
        memo = self._last
        if memo[2] <= now < memo[3] and memo[0] == txids and memo[1] is secure:
            return memo
        expires = int(now + self.expiry)
        if len(txids) == 1:
            value = format_txid(txids[0])
        else:
            value = "-".join([format_txid(txid) for txid in txids])
        if self.secret is not None:
            payload = f"{value}.{expires:x}"
            value = f"{payload}.{_sign(self.secret, payload)}"
        header = f"{COOKIE_NAME}={value}{_attributes(expires, secure)}"
        # One tuple: threads see it whole. It serves while int(now + expiry) stays ``expires``
        # (to within a float's rounding at the edge of the second: an Expires a second off).
        made = self._last = (txids, secure, expires - self.expiry, expires + 1 - self.expiry, header)
        return made


def value_of(set_cookie: str) -> str:
    """The cookie's value in a ``Set-Cookie`` header made by ``TxidCookie.header``: the
    ``txid_header`` carries exactly it (a value never holds ``;``)."""
    return set_cookie[len(COOKIE_NAME) + 1 : set_cookie.index(";")]

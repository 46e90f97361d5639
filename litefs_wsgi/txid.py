"""Parse and format LiteFS transaction IDs and position files, exactly as LiteFS does."""

from __future__ import annotations

import re
from typing import NamedTuple

# LiteFS checks the length is 16, then strconv.ParseUint(s, 16, 64): ASCII hex digits only.
# Python's int(s, 16) alone would also take "0x", signs, "_", spaces and non-ASCII digits.
_TXID = re.compile(r"[0-9a-fA-F]{16}")
_LOWER_HEX = b"0123456789abcdef"


class Pos(NamedTuple):
    """A database's position: the last committed TXID and the checksum after applying it."""

    txid: int
    checksum: int


def parse_txid(text: str) -> int | None:
    """Return the TXID written as exactly 16 hex digits, or None if ``text`` is not one."""
    if not isinstance(text, str) or not _TXID.fullmatch(text):
        return None
    return int(text, 16)


def format_txid(txid: int) -> str:
    """Return ``txid`` as LiteFS writes it: 16 lowercase hex digits."""
    if not 0 <= txid < 1 << 64:
        raise ValueError(f"TXID out of range: {txid!r}")
    return f"{txid:016x}"


def parse_pos(data: bytes) -> Pos | None:
    """Parse a ``-pos`` file (``%016x/%016x\\n``); None when it is torn, empty or garbage."""
    txid = parse_pos_txid(data)
    return None if txid is None else Pos(txid, int(data[17:33], 16))


def parse_pos_txid(data: bytes) -> int | None:
    """The TXID of a ``-pos`` file, the checksum checked but not parsed; None when it is torn,
    empty or garbage."""
    # Checked with one C call that deletes the hex digits (a fraction of a regex's cost): what
    # is left must be the "/" and "\n" in their places. (A write that reads the same bytes as
    # the last one does not come here: LiteFSMiddleware keeps its cookie.)
    if len(data) == 34 and data[16] == 0x2F and data[33] == 0x0A and data.translate(None, _LOWER_HEX) == b"/\n":
        return int(data[:16], 16)
    return None


def format_pos(pos: Pos) -> bytes:
    """Return the 34 bytes of a ``-pos`` file for ``pos``."""
    return f"{format_txid(pos.txid)}/{format_txid(pos.checksum)}\n".encode("ascii")

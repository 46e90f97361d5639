"""TXIDs and position files are read and written exactly as LiteFS does (SPEC.md section 1)."""

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from litefs_wsgi.txid import Pos, format_pos, format_txid, parse_pos, parse_txid


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0000000000000000", 0),
        ("0000000000000001", 1),
        ("00000000000000ff", 255),
        ("ffffffffffffffff", (1 << 64) - 1),
        # Go's strconv.ParseUint(s, 16, 64) takes upper case too.
        ("00000000000000FF", 255),
        ("ABCDEF0123456789", 0xABCDEF0123456789),
    ],
)
def test_parse_txid_accepts_16_hex_digits(text, value):
    assert parse_txid(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "000000000000001",  # 15 digits
        "00000000000000001",  # 17 digits
        "0x00000000000001",  # 16 characters, but Go rejects the prefix with base 16
        "0X00000000000001",
        "+000000000000001",
        "-000000000000001",
        "0000_00000000001",  # Python's int() takes underscores, Go's ParseUint(base 16) does not
        " 000000000000001",
        "000000000000001 ",
        "000000000000001\n",
        "0000000000000001\n",
        "000000000000000g",
        "\u0660" * 16,  # Arabic-Indic digits: int() would read them as 0
        "\uff10" * 15 + "\uff11",  # fullwidth digits
        "\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661",
        "000000000000000\u00b9",  # superscript one
    ],
)
def test_parse_txid_rejects_anything_else(text):
    assert parse_txid(text) is None


@pytest.mark.parametrize("value", [None, 1, b"0000000000000001"])
def test_parse_txid_rejects_non_strings(value):
    assert parse_txid(value) is None


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_format_txid_round_trips(value):
    text = format_txid(value)
    assert len(text) == 16
    assert text == text.lower()
    assert parse_txid(text) == value


def test_format_txid_is_lowercase_zero_padded():
    assert format_txid(0) == "0000000000000000"
    assert format_txid(0xAB) == "00000000000000ab"


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_format_txid_refuses_out_of_range(value):
    with pytest.raises(ValueError):
        format_txid(value)


def test_format_pos_is_34_bytes():
    data = format_pos(Pos(7, 0xDEADBEEF))
    assert data == b"0000000000000007/00000000deadbeef\n"
    assert len(data) == 34


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_pos_round_trips(txid, checksum):
    assert parse_pos(format_pos(Pos(txid, checksum))) == Pos(txid, checksum)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"0000000000000007",  # torn: a read in the middle of a write
        b"0000000000000007/",
        b"0000000000000007/00000000deadbeef",  # no newline: also torn
        b"0000000000000007/00000000deadbeef\n\n",
        b"0000000000000007/00000000deadbeef\nX",
        b"000000000000007/000000000deadbeef\n",
        b"0000000000000007 00000000deadbeef\n",
        b"0000000000000007/00000000deadbeeg\n",
        b"\x00" * 34,
        b"garbage",
        # LiteFS writes lower case (%016x); anything else did not come from LiteFS.
        b"000000000000000A/00000000deadbeef\n",
        b"0000000000000007/00000000DEADBEEF\n",
    ],
)
def test_parse_pos_rejects_torn_and_garbage(data):
    assert parse_pos(data) is None


def test_the_last_position_kept_is_never_one_not_parsed():
    # In a fresh interpreter, before any position was parsed: the kept entry must not make
    # an empty (torn) file read as TXID 0.
    code = (
        "from litefs_wsgi.txid import parse_pos, parse_pos_txid\n"
        "assert parse_pos_txid(b'') is None and parse_pos(b'') is None\n"
        "assert parse_pos_txid(b'0000000000000007/00000000deadbeef\\n') == 7\n"
        "assert parse_pos_txid(b'') is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

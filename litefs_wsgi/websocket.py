"""Pipe a WebSocket between gunicorn's client socket and the target (placeholder)."""

from __future__ import annotations


def is_websocket_upgrade(environ: dict) -> bool:
    """True for an ``Upgrade: websocket`` request."""
    return "websocket" in (environ.get("HTTP_UPGRADE") or "").lower()


def tunnel(environ, start_response, target, forwarder, idle_timeout):
    raise NotImplementedError

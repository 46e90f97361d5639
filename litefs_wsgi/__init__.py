"""litefs-wsgi: LiteFS's proxy rules for Python web apps, in-process or standalone."""

from .config import Config, ConfigError
from .middleware import LiteFSMiddleware, ReplayOnPrimary
from .watcher import is_primary, primary_hostname


def require_primary() -> None:
    """Raise ReplayOnPrimary on a replica, so the request runs on the primary instead."""
    if not is_primary():
        raise ReplayOnPrimary()


__all__ = [
    "Config",
    "ConfigError",
    "LiteFSMiddleware",
    "ReplayOnPrimary",
    "is_primary",
    "primary_hostname",
    "require_primary",
]
__version__ = "0.1.0"

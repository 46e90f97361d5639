"""A primary and a replica on 127.0.0.1, each a Flask app behind LiteFSMiddleware (placeholder)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="run the story without a person; exit 0 if it held")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("litefs-wsgi demo: not written yet")

"""The lab's commands for `icar` (registered through the `icar.commands` entry point)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `icar calibrate`. Heavy imports happen inside the handler, so `icar --help` stays fast."""
    calibrate = subparsers.add_parser("calibrate", help="measure routes on a captioned sample, write routes")
    calibrate.set_defaults(func=lambda args: 0)

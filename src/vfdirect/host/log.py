"""Structured logs of the host daemon.

The line formats of :mod:`vfdirect.eventlog`, under the logger ``vfdirect.host``.
"""

from __future__ import annotations

import logging
from typing import TextIO

from vfdirect import eventlog
from vfdirect.eventlog import JsonFormatter, TextFormatter, log_event

LOGGER_NAME = "vfdirect.host"

__all__ = ["LOGGER_NAME", "JsonFormatter", "TextFormatter", "log_event", "setup_logging"]


def setup_logging(fmt: str = "text", stream: TextIO | None = None,
                  level: int = logging.INFO) -> logging.Logger:
    return eventlog.setup_logging(LOGGER_NAME, fmt, stream, level)

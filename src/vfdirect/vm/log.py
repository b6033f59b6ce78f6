"""Structured logs of the VM process: one line per event on stderr, text or JSON (the
same line formats as the adapter's; daemons do not import each other). The workload's
result is NOT a log line: it is printed alone on stdout."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LOGGER_NAME = "vfdirect.vm"
_FIELDS = "vfd_fields"


def _ts(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"ts": _ts(record), "level": record.levelname,
                               "event": record.getMessage()}
        obj.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record), record.levelname, record.getMessage()]
        for key, value in getattr(record, _FIELDS, {}).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if not text or any(c.isspace() or c in '"=' for c in text):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        if record.exc_info:
            parts.append("traceback=" + json.dumps(self.formatException(record.exc_info)))
        return " ".join(parts)


def setup_logging(fmt: str = "text", stream: TextIO | None = None,
                  level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Text())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO,
              **fields: Any) -> None:
    logger.log(level, event, extra={_FIELDS: fields})

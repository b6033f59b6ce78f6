"""Structured logs of every vfdirect process: one line per event, text or JSON.

An event is a name and fields: ``log_event(log, "pf_request", method="vf_get", ms=0.2)``.
Text: ``2025-01-01T00:00:00.000Z INFO pf_request method=vf_get ms=0.2``; JSON: one object
per line with ``ts``, ``level``, ``event`` and the fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_FIELDS = "vfd_fields"


def _ts(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"ts": _ts(record), "level": record.levelname,
                               "event": record.getMessage()}
        obj.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record), record.levelname, record.getMessage()]
        for key, value in getattr(record, _FIELDS, {}).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if not text or any(c.isspace() or c in '"=' for c in text):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        if record.exc_info:
            # keep one line per event: the traceback as an escaped field
            parts.append("traceback=" + json.dumps(self.formatException(record.exc_info)))
        return " ".join(parts)


def setup_logging(name: str, fmt: str = "text", stream: TextIO | None = None,
                  level: int = logging.INFO) -> logging.Logger:
    """The logger ``name``, writing one line per event to ``stream`` (stderr)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO,
              exc_info: BaseException | None = None, **fields: Any) -> None:
    logger.log(level, event, extra={_FIELDS: fields}, exc_info=exc_info)

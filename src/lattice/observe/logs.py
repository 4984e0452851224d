"""Logging setup for the daemon: levels, and either text lines or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time

from lattice.observe.inert import inert

__all__ = ["LOG_FORMATS", "InertFormatter", "JSONFormatter", "setup_logging"]

LOG_FORMATS = ("text", "json")


class JSONFormatter(logging.Formatter):
    """``{"ts": ..., "level": "info", "logger": ..., "msg": ...}`` (+ "exc" when there is one):
    what log shippers (Loki, Elasticsearch, journald) parse without regexes."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class InertFormatter(logging.Formatter):
    """Text lines for a terminal: a message that quotes a remote peer (its agent, a protocol name)
    shows escape sequences and line breaks as visible escapes (lattice.observe.inert), so it can
    neither drive the terminal nor forge log lines; tracebacks keep their line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return inert(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return inert(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return inert(super().formatStack(stack_info), keep="\n")


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(InertFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

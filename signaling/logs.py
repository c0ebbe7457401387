"""Logging set-up: readable lines by default, JSON lines with ``--log-format json``.

Every record carries the node id; media events add ``stream`` and ``resource`` through
``extra=``. Nothing at INFO level may contain SDP or tokens.
"""

from __future__ import annotations

import json
import logging
import time

_CONTEXT = ("stream", "resource")


class _NodeFilter(logging.Filter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "node": getattr(record, "node", None),
        }
        for key in _CONTEXT:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={getattr(record, k)}" for k in _CONTEXT if hasattr(record, k))
        line = super().format(record)
        return f"{line} [{context}]" if context else line


def configure(level: str, fmt: str, node_id: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_NodeFilter(node_id))
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = HumanFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)

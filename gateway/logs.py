"""Logging setup. Invariant: nothing at INFO or above carries patient data.

pynetdicom's identifier logging (it prints C-FIND/C-STORE identifiers) and its per-event standard
handlers are turned off; its own loggers are raised to WARNING. Our modules log AE titles, peer
addresses, UIDs, statuses and counts only.
"""

from __future__ import annotations

import logging
import sys

from pynetdicom import _config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_pynetdicom() -> None:
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def setup(level: str) -> None:
    quiet_pynetdicom()
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)

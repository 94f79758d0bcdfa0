"""Logging setup. Invariant: no log line carries patient data (names, patient IDs, birth dates,
accession numbers), at any level, DEBUG included.

pynetdicom's identifier logging (it prints C-FIND/C-MOVE/C-GET identifiers and C-STORE data sets
element by element) and its per-event standard handlers (PDU dumps) are turned off, and its own
loggers are raised to WARNING, so that ``logging.level = "DEBUG"`` shows our debug lines and
third-party ones (urllib3: method, path and status) but none of its dumps. Our modules log AE
titles, peer addresses, UIDs, statuses and counts only. ``tests/test_logs_canary.py`` proves it on
every path (store, refusals, remap, forward, C-FIND, C-MOVE, C-GET) at DEBUG and INFO; with
``LOG_REQUEST_IDENTIFIERS`` on it fails.
"""

from __future__ import annotations

import logging
import sys
import warnings

from pynetdicom import _config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_pynetdicom() -> None:
    """Before any association: pynetdicom reads these per event."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def setup(level: str) -> None:
    quiet_pynetdicom()
    # pydicom reports a bad value with ``warnings.warn``, value included ("Invalid value for VR
    # PN: '...'"), and Python prints warnings to stderr, which is this log: not in the service.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)

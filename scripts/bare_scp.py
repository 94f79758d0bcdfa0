"""A bare pynetdicom Storage SCP for the receive benchmark (``scripts/bench.py``).

Why it exists: it is the floor a pynetdicom-based receiver starts from. It does nothing but write
what it receives, with the tuning ARCHITECTURE.md measured (unlimited max PDU, no log handlers,
TCP_NODELAY on accepted sockets, ``STORE_RECV_CHUNKED_DATASET``), so the gateway's receive rate
can be read against what pynetdicom itself allows on the same machine and run.

Each C-STORE's dataset, which pynetdicom has already streamed to a temporary file in the DICOM
File Format, is renamed to ``OUT_DIR/<AffectedSOPInstanceUID>.dcm`` (the temporary folder is a
sibling of OUT_DIR, so the rename stays on one filesystem) and answered with Success. No
validation, no fsync, no database. Listens on 127.0.0.1 only; accepts every storage SOP class in
Explicit or Implicit VR Little Endian; exits 0 on SIGTERM or SIGINT.

Usage: ``.venv/bin/python scripts/bare_scp.py --port P --out DIR [--aet TITLE]``
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE

BIND_HOST = "127.0.0.1"
DEFAULT_AET = "BARESCP"
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

# Module-level settings, read by pynetdicom when associations are made and messages decoded.
_config.LOG_HANDLER_LEVEL = "none"
_config.STORE_RECV_CHUNKED_DATASET = True


def on_conn_open(event: evt.Event) -> None:
    """Nagle off on the accepted socket, so no C-STORE-RSP waits for a delayed ACK."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_c_store(event: evt.Event, out_dir: Path) -> int:
    """Rename the streamed temporary file into OUT_DIR; pynetdicom's later unlink of the temporary
    path then fails quietly, as it is written to."""
    uid = cast(C_STORE, event.request).AffectedSOPInstanceUID
    os.replace(event.dataset_path, out_dir / f"{uid}.dcm")
    return 0x0000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bare_scp.py",
        description="Bare pynetdicom Storage SCP on 127.0.0.1 writing every instance to --out.",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--out", type=Path, required=True, help="folder for received files")
    parser.add_argument("--aet", default=DEFAULT_AET, help=f"AE title (default {DEFAULT_AET})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = out_dir.parent / f"{out_dir.name}.tmp"
    temp_dir.mkdir(exist_ok=True)
    tempfile.tempdir = str(temp_dir)  # where pynetdicom's NamedTemporaryFile goes

    # Block the stop signals before any thread exists (threads inherit the mask), then wait for
    # one synchronously: a SIGTERM that arrives during start-up stays pending instead of lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    ae = AE(ae_title=args.aet)
    ae.maximum_pdu_size = 0  # no limit on the P-DATA PDUs the sender may use
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(
            context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, on_conn_open),
        (evt.EVT_C_STORE, on_c_store, [out_dir]),
    ]
    ae.start_server((BIND_HOST, args.port), block=False, evt_handlers=handlers)
    try:
        signal.sigwait(STOP_SIGNALS)
    finally:
        ae.shutdown()
        try:
            temp_dir.rmdir()
        except OSError:  # not empty: something was mid-transfer; leave it for inspection
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

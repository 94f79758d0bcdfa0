"""What every destination offers the forward worker, and the error classification they share.

A destination turns its protocol's answers into ``Delivered`` / ``Failed`` per instance (permanent
or not) and raises ``RetriableError`` when the whole exchange failed (refused, timed out, reset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.errors import PermanentError, RetriableError
from gateway.forward.outbox import Delivered, Failed, Outgoing, Result, Sent


class Destination(Protocol):
    name: str

    def send(self, batch: Sequence[Outgoing]) -> list[Result]:
        """Results in batch order; a job left without a result was not tried (its turn comes
        again, in order). Raises RetriableError when nothing could be sent."""
        ...

    def holds(self, study_uid: str, sent: Sequence[Sent]) -> set[str]:
        """The SOP Instance UIDs of ``sent`` the destination has now."""
        ...

    def probe(self) -> None:
        """Return when the destination answers; raise RetriableError otherwise."""
        ...

    def close(self) -> None: ...


def send_each(batch: Sequence[Outgoing], send_one: Callable[[Outgoing], str | None]) -> list[Result]:
    """One instance after another, stopping at the first retriable failure so that the study's
    order holds; a permanent failure of one instance does not stop the others."""
    results: list[Result] = []
    for job in batch:
        try:
            results.append(Delivered(job, send_one(job)))
        except PermanentError as exc:
            results.append(Failed(job, str(exc), permanent=True))
        except RetriableError as exc:
            if not results:
                raise
            results.append(Failed(job, str(exc), permanent=False))
            break
    return results


# 4xx answers about the instance itself. 401/403/404/405 say the destination is set up wrongly
# (credentials, URL): retried with the breaker open, rather than every instance dead-lettered.
_REFUSES_INSTANCE = {400, 409, 413, 415, 422}


def http_error(status: int, what: str) -> Exception:
    if status in _REFUSES_INSTANCE:
        return PermanentError(f"{what}: HTTP {status}")
    return RetriableError(f"{what}: HTTP {status}")

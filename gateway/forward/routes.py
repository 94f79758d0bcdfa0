"""Which destinations an instance goes to, decided once in the C-STORE handler.

Routes match the header as received (the same ``match`` as the remap rules), so the decision is
known before the instance is recorded and its outbox jobs are written in the same transaction.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from gateway.config import ForwardConfig
from gateway.remap.plan import Subject, matches


class Router:
    def __init__(self, config: ForwardConfig) -> None:
        self._routes = config.routes
        names = tuple(d.name for d in config.destinations)
        self._default = names if config.default_destinations is None else config.default_destinations

    def destinations_for(self, subject: Subject, ds: Dataset) -> tuple[str, ...]:
        """Every matching route's destinations, in configuration order, each once."""
        chosen: list[str] = []
        for route in self._routes:
            if matches(route.match, subject, ds):
                chosen.extend(d for d in route.destinations if d not in chosen)
        return tuple(chosen) if chosen else self._default

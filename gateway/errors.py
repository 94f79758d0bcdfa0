"""The gateway's error kinds, classified once where they arise.

A handler maps ``RetriableError`` to a transient DIMSE status (the sender should try again) and
``PermanentError`` to a refusal; ``ConfigError`` stops the process before it listens.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration cannot be used; ``problems`` lists each one, key and fix included."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class RetriableError(GatewayError):
    """The operation may succeed later (disk full, database unavailable)."""


class PermanentError(GatewayError):
    """The input itself is wrong; trying again with the same input fails the same way."""

"""One ``requests`` session per sending thread, with the destination's credentials and TLS.

The environment (proxies, CA bundle) is read once, when a session is made, not at every request:
``requests`` would otherwise walk the whole environment and look for a ``.netrc`` per instance,
about 5% of the forward process's CPU. Credentials come from the configuration only."""

from __future__ import annotations

import os
import threading

import requests

from gateway.config import _HttpDestination
from gateway.errors import RetriableError


class Sessions:
    def __init__(self, config: _HttpDestination) -> None:
        self._config = config
        self._auth = None
        password = config.password(os.environ)
        if config.username:
            self._auth = (config.username, password or "")
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = self._auth
            session.trust_env = False
            session.proxies.update(requests.utils.get_environ_proxies(self._config.url))
            session.verify = self._verify()
            self._local.session = session
            with self._lock:
                self._all.append(session)
        return session

    def _verify(self) -> bool | str:
        """The destination's CA file; else, when verifying, the bundle the environment names
        as ``requests`` itself would (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE); else the default."""
        if self._config.ca_file:
            return str(self._config.ca_file)
        if not self._config.verify_tls:
            return False
        return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    def request(self, method: str, url: str, **kwargs: object) -> requests.Response:
        """Network trouble (refused, reset, timed out, TLS) is retriable, named by its kind."""
        try:
            return self.get().request(method, url, timeout=self._config.timeout_s, **kwargs)  # type: ignore[arg-type]
        except requests.RequestException as exc:
            raise RetriableError(f"{self._config.name}: {type(exc).__name__}") from exc

    def close(self) -> None:
        with self._lock:
            for session in self._all:
                session.close()

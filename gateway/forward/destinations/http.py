"""One ``urllib3`` connection pool per HTTP destination, with its credentials, TLS and proxy.

urllib3 rather than ``requests`` (which is built on it): per 0.5 MB ``POST /instances`` it costs
about 1.0 ms of CPU against 1.5 ms, and during a drain the forward process, Orthanc and the
receiver share two cores, so that half millisecond is Orthanc's. Nothing of ``requests`` was used
beyond what urllib3 does itself: no redirects (a 3xx is an error worth seeing), no cookies, no
retries (the outbox retries, with backoff and a breaker). The environment (proxies, CA bundle) is
read once, when the pool is made; credentials come from the configuration only.
"""

from __future__ import annotations

import json as jsonlib
import logging
import os
import urllib.request
from collections.abc import Mapping
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

import urllib3
from urllib3.exceptions import HTTPError

from gateway.config import _HttpDestination
from gateway.errors import RetriableError

log = logging.getLogger(__name__)

# Threads sending at once, plus the confirmer's and the breaker's probe: each keeps its connection.
SPARE_CONNECTIONS = 2


class Response:
    """The answer, read whole: every answer we take is small JSON or one instance."""

    def __init__(self, status: int, content: bytes) -> None:
        self.status_code = status
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class Sessions:
    """Thread-safe: urllib3 hands each thread a connection of its own from the pool."""

    def __init__(self, config: _HttpDestination) -> None:
        self._config = config
        self._headers: dict[str, str] = {}
        if config.username:
            password = config.password(os.environ) or ""
            self._headers = urllib3.make_headers(basic_auth=f"{config.username}:{password}")
        self._pool = _pool_for(config, maxsize=config.concurrency + SPARE_CONNECTIONS)
        self._timeout = urllib3.Timeout(connect=config.timeout_s, read=config.timeout_s)

    def request(
        self, method: str, url: str, *, data: bytes | BinaryIO | None = None,
        json: object = None, params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Network trouble (refused, reset, timed out, TLS) is retriable, named by its kind."""
        sent = {**self._headers, **(headers or {})}
        body = data
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent["Content-Type"] = "application/json"
        if params:
            url = f"{url}?{urlencode(params)}"
        if body is not None and not isinstance(body, bytes):
            # a streamed file goes with its length, not chunked: not every server takes chunks
            sent["Content-Length"] = str(os.fstat(body.fileno()).st_size - body.tell())
        try:
            answer = self._pool.request(
                method, url, body=body, headers=sent, timeout=self._timeout,
                retries=False, redirect=False, preload_content=True,
            )
        except HTTPError as exc:
            raise RetriableError(f"{self._config.name}: {type(exc).__name__}") from exc
        return Response(answer.status, answer.data)

    def close(self) -> None:
        self._pool.clear()


def _pool_for(config: _HttpDestination, maxsize: int) -> urllib3.PoolManager:
    """The CA file configured; else, unless told not to verify, the bundle the environment names
    as ``requests`` would (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE); else the system's trust store.
    A proxy only when the environment names one for this host and ``no_proxy`` does not
    exclude it, as curl and ``requests`` read those variables."""
    tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    env_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    parts = urlsplit(config.url)
    if config.ca_file:
        tls["ca_certs"] = str(config.ca_file)
    elif not config.verify_tls:
        tls["cert_reqs"] = "CERT_NONE"
        if parts.scheme == "https":  # said once here, not by urllib3 at every request
            log.warning("destination %s: TLS certificates are not verified (verify_tls: false)",
                        config.name)
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    elif env_bundle:
        tls["ca_certs"] = env_bundle
    # block: a thread waits for a free connection rather than opening one that is then thrown away
    common: dict[str, Any] = {"num_pools": 2, "maxsize": maxsize, "block": True, **tls}
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return urllib3.ProxyManager(proxy, **common)
    return urllib3.PoolManager(**common)

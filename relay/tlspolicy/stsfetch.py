"""Fetching an MTA-STS policy over HTTPS (RFC 8461 3.3), as strictly as the RFC asks.

Role: :class:`StsFetcher` gets ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``
(port ``delivery.mta_sts_port``, 443 unless a lab says otherwise) with aiohttp: the
certificate must be valid for ``mta-sts.DOMAIN`` against the same CA store as
``verify`` (``delivery.ca_file`` when set, else the system's); no redirects; only
``200``; media type ``text/plain``; a body over 64 KiB is an error, not truncated;
every step bounded by one timeout.  The name is resolved by the relay's own resolver
(``delivery.resolver``), like every other lookup.  Failures are :class:`StsError`
with the RFC 8460 result type a report needs.
Not: the TXT lookup, the cache or refresh (the policy store), or parsing
(relay.tlspolicy.mtasts).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.domains import Domain
from relay.tlspolicy.contexts import trust_store_context
from relay.tlspolicy.mtasts import MAX_POLICY_BYTES, StsError, StsPolicy, parse_policy

FETCH_ERROR = "sts-policy-fetch-error"  # RFC 8460 4.3 result types
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"
FETCH_TIMEOUT = 10.0  # seconds for the whole fetch: connect, TLS, request, body

Lookup = Callable[[str], Awaitable[tuple[str, ...]]]  # host -> its addresses


class FetchError(StsError):
    """The policy could not be fetched; ``result_type`` is the RFC 8460 name."""

    def __init__(self, message: str, result_type: str) -> None:
        super().__init__(message)
        self.result_type = result_type


class RelayResolver(AbstractResolver):
    """aiohttp's resolver hook, answered by the relay's resolver (delivery.resolver)."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self._lookup(host)
        if not addresses:
            raise OSError(f"{host} has no address")
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in addresses
        ]

    async def close(self) -> None:
        return None


class StsFetcher:
    """One HTTPS client for every policy fetch (made at the first fetch, on its loop)."""

    def __init__(
        self,
        lookup: Lookup,
        ca_file: Path | None,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self._lookup = lookup
        self._context = trust_store_context(ca_file)  # WebPKI, name checked (RFC 8461 3.3)
        self._port = port
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def url(self, domain: Domain) -> str:
        port = "" if self._port == 443 else f":{self._port}"
        return f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"

    async def fetch(self, domain: Domain) -> StsPolicy:
        """The policy of *domain*, or FetchError / StsError saying why not."""
        url = self.url(domain)
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._get(url)
        except TimeoutError as exc:
            raise FetchError(f"{url}: no answer within {self._timeout:g}s", FETCH_ERROR) from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FetchError(
                f"{url}: certificate not valid: {exc.certificate_error}", WEBPKI_INVALID
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise FetchError(f"{url}: TLS failed: {exc}", WEBPKI_INVALID) from exc
        except (aiohttp.ClientError, OSError) as exc:
            cause = getattr(exc, "os_error", None) or exc  # aiohttp wraps connect errors
            raise FetchError(f"{url}: {cause or type(exc).__name__}", FETCH_ERROR) from exc
        try:
            return parse_policy(body)
        except StsError as exc:
            raise FetchError(f"{url}: {exc}", POLICY_INVALID) from exc

    async def _get(self, url: str) -> bytes:
        session = self._client()
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:  # RFC 8461 3.3: no redirects, only 200
                raise FetchError(f"{url}: HTTP {response.status}, not 200", FETCH_ERROR)
            if response.content_type != "text/plain":
                raise FetchError(
                    f"{url}: media type {response.content_type!r}, not text/plain",
                    POLICY_INVALID,
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(16384):
                body += chunk
                if len(body) > MAX_POLICY_BYTES:  # RFC 8461 3.3: an error, not truncated
                    why = f"{url}: policy larger than {MAX_POLICY_BYTES} bytes"
                    raise FetchError(why, POLICY_INVALID)
            return bytes(body)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=RelayResolver(self._lookup), ssl=self._context, use_dns_cache=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                # identity: a 64 KiB text file needs no compression, and a compressed
                # body could expand far past the limit before it is counted.
                headers={"User-Agent": "tls-relay (MTA-STS)", "Accept-Encoding": "identity"},
                trust_env=False,  # never through a proxy from the environment
                auto_decompress=False,  # a gzip body is an invalid policy, never expanded
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

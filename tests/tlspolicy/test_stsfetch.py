"""relay.tlspolicy.stsfetch against a real HTTPS server on loopback (aiohttp.web with a
trustme certificate): what RFC 8461 3.3 accepts, and every way a fetch must fail."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from relay.domains import Domain
from relay.tlspolicy.mtasts import MAX_POLICY_BYTES, Mode
from relay.tlspolicy.stsfetch import (
    FETCH_ERROR,
    POLICY_INVALID,
    WEBPKI_INVALID,
    FetchError,
    StsFetcher,
)

DOMAIN = Domain("example.test")
POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmax_age: 604800\r\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(handler: Handler, cert: trustme.LeafCert) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/.well-known/mta-sts.txt", handler)
    app.router.add_get("/elsewhere", _text(POLICY))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@pytest.fixture
async def fetch_with(
    ca: trustme.CA, ca_file: Path
) -> AsyncIterator[Callable[..., Awaitable[object]]]:
    """fetch_with(handler, cert_name=..., timeout=...) -> the fetch's result or error."""
    runners: list[web.AppRunner] = []
    fetchers: list[StsFetcher] = []

    async def run(handler: Handler, cert_name: str = "mta-sts.example.test", **kw: float) -> object:
        runner, port = await serve(handler, ca.issue_cert(cert_name))
        runners.append(runner)

        async def lookup(host: str) -> tuple[str, ...]:
            assert host == "mta-sts.example.test"
            return ("127.0.0.1",)

        fetcher = StsFetcher(lookup, ca_file, port=port, **kw)
        fetchers.append(fetcher)
        try:
            return await fetcher.fetch(DOMAIN)
        except FetchError as exc:
            return exc

    yield run
    for fetcher in fetchers:
        await fetcher.close()
    for runner in runners:
        await runner.cleanup()


async def test_a_policy_is_fetched_and_parsed(fetch_with: Callable[..., Awaitable[object]]) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(body=POLICY, content_type="text/plain", charset="utf-8")

    policy = await fetch_with(ok)
    assert not isinstance(policy, Exception), policy
    assert policy.mode is Mode.ENFORCE and policy.mx == ("mx1.example.test",)  # type: ignore[attr-defined]


def _text(body: bytes, status: int = 200, ctype: str = "text/plain") -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type=ctype)

    return handler


async def _redirect(_: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


async def _slow(_: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(body=POLICY, content_type="text/plain")


@pytest.mark.parametrize(
    ("handler", "kwargs", "result_type", "why"),
    [
        (_text(b"", status=404), {}, FETCH_ERROR, "HTTP 404, not 200"),
        (_redirect, {}, FETCH_ERROR, "HTTP 302, not 200"),  # never followed
        (_text(POLICY, ctype="text/html"), {}, POLICY_INVALID, "media type 'text/html'"),
        (_text(POLICY + b"#" * MAX_POLICY_BYTES), {}, POLICY_INVALID, "larger than"),
        (_text(b"version: STSv1\nmode: enforce\n"), {}, POLICY_INVALID, "max_age"),
        (_slow, {"timeout": 0.5}, FETCH_ERROR, "no answer within 0.5s"),
    ],
)
async def test_fetch_failures(
    fetch_with: Callable[..., Awaitable[object]],
    handler: Handler,
    kwargs: dict[str, float],
    result_type: str,
    why: str,
) -> None:
    got = await fetch_with(handler, **kwargs)
    assert isinstance(got, FetchError), got
    assert got.result_type == result_type and why in str(got), str(got)


async def test_the_certificate_must_name_mta_sts_domain(
    fetch_with: Callable[..., Awaitable[object]],
) -> None:
    got = await fetch_with(_text(POLICY), cert_name="www.example.test")
    assert isinstance(got, FetchError) and got.result_type == WEBPKI_INVALID, got
    assert "certificate not valid" in str(got)


async def test_a_certificate_from_another_ca_is_refused(ca_file: Path, tmp_path: Path) -> None:
    other = trustme.CA()
    runner, port = await serve(_text(POLICY), other.issue_cert("mta-sts.example.test"))

    async def lookup(host: str) -> tuple[str, ...]:
        return ("127.0.0.1",)

    fetcher = StsFetcher(lookup, ca_file, port=port)
    try:
        with pytest.raises(FetchError) as info:
            await fetcher.fetch(DOMAIN)
    finally:
        await fetcher.close()
        await runner.cleanup()
    assert info.value.result_type == WEBPKI_INVALID


async def test_a_name_without_address_is_a_fetch_error(ca_file: Path) -> None:
    async def nothing(host: str) -> tuple[str, ...]:
        return ()

    fetcher = StsFetcher(nothing, ca_file, port=443)
    try:
        with pytest.raises(FetchError) as info:
            await fetcher.fetch(DOMAIN)
    finally:
        await fetcher.close()
    assert info.value.result_type == FETCH_ERROR and "no address" in str(info.value)

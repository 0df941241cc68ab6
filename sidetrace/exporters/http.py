"""What every HTTP exporter shares: a TLS context from its section, one session, and transport failures
read as Answers for the delivery loop (the backend's own answers are each exporter's to read)."""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Callable

import aiohttp

from sidetrace.config import ClientTlsSection
from sidetrace.exporters.delivery import Answer, Verdict

# (status, body, content type, Retry-After header) -> what the answer means for the data
ReadAnswer = Callable[[int, bytes, str, "str | None"], Answer]


def client_ssl(tls: ClientTlsSection) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca_file or None)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class HttpPoster:
    """POSTs to one URL with fixed headers; a connection, TLS or timeout failure becomes an Answer."""

    def __init__(self, url: str, headers: dict[str, str], tls: ClientTlsSection, timeout_seconds: float) -> None:
        self.url = url
        self.headers = headers
        self._ssl: ssl.SSLContext | bool = client_ssl(tls) if url.startswith("https://") else True
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: bytes, read_answer: ReadAnswer) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        # Let the loop take in what reached idle connections first, so a keep-alive connection the backend has
        # already closed (its FIN here while the loop was busy) leaves the pool instead of taking this request and
        # failing it as connection_lost: the first turn polls the sockets, the second runs their callbacks.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        try:
            async with self._session.post(self.url, data=body, headers=self.headers, ssl=self._ssl) as response:
                payload = await response.read()
                return read_answer(response.status, payload, response.content_type,
                                   response.headers.get("Retry-After"))
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            return Answer(Verdict.FAULT, "tls", f"TLS: {exc}")
        except aiohttp.ClientConnectorError as exc:
            return Answer(Verdict.FAULT, "connection_refused", f"{type(exc).__name__}: {exc}")
        except asyncio.TimeoutError:
            return Answer(Verdict.RETRY, "timeout", f"no answer within {self._timeout.total:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(Verdict.RETRY, "connection_lost", f"{type(exc).__name__}: {exc}",
                          incomplete=_failed_while_writing(exc))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _failed_while_writing(exc: BaseException) -> bool:
    """Whether the connection failed while the request was being written, so the backend cannot have it whole: a
    send the kernel refused (EPIPE: the backend had closed the connection, and asyncio drops what it could not send),
    a write to a connection already closing (ClientConnectionResetError), or the connection lost with part of the
    body still waiting in the transport's buffer ("Can not write request body"). A connection lost after the last
    byte was handed to the kernel (ServerDisconnectedError, a reset while reading the answer) may have delivered it:
    not this."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionResetError) or (
                isinstance(cause, OSError) and cause.errno == errno.EPIPE):
            return True
        cause = cause.__cause__
    return isinstance(exc, aiohttp.ClientOSError) and str(exc).startswith("Can not write request body")

"""What every HTTP exporter shares: a TLS context from its section, one session, and transport failures
read as Answers for the delivery loop (the backend's own answers are each exporter's to read)."""

from __future__ import annotations

import asyncio
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
            return Answer(Verdict.RETRY, "connection_lost", f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

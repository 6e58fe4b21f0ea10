"""TLS with client certificates under uvicorn.

uvicorn verifies a presented client certificate against the CA (``ssl_ca_certs``) but does
not hand it to the application; :class:`ClientCertH11Protocol` adds it to the ASGI scope
as the standard TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM),
which :func:`client_certificate_der` reads. The website runs with certificates optional
(they matter only in the certificate and parallel periods); the REST API and the download
service refuse a request without one.
"""
from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class ClientCertH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        info: dict = {"client_cert_chain": [], "client_cert_error": None}
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                info["client_cert_chain"] = [ssl.DER_cert_to_PEM_cert(der)]
            info["tls_version"] = ssl_object.version()
            cipher = ssl_object.cipher()
            info["cipher_suite"] = cipher[0] if cipher else None
        inner = self.app

        async def app_with_tls(scope, receive, send):
            if scope["type"] in ("http", "websocket"):
                scope = dict(scope)
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": info}
            await inner(scope, receive, send)

        self.app = app_with_tls


def client_certificate_der(scope) -> bytes | None:
    chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or []
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])


def server_config(app, *, host: str, port: int, certfile: Path, keyfile: Path, ca_certs: Path,
                  log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile), ssl_ca_certs=str(ca_certs),
        ssl_cert_reqs=ssl.CERT_OPTIONAL, http=ClientCertH11Protocol, log_level=log_level, lifespan="off",
        access_log=False,
    )


class BackgroundServer:
    """uvicorn in a thread (tests, the demo): ``with BackgroundServer(config) as srv: ...``."""

    def __init__(self, config: uvicorn.Config):
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        for _ in range(1000):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            threading.Event().wait(0.01)
        raise RuntimeError("the server did not start within 10 seconds")

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

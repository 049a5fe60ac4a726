"""Test support for egress: a certificate authority of the test's own (openssl CLI) and
HTTPS/HTTP servers on this host's loopback that agents reach through the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

BODY = b"hello through the egress proxy\n"


@dataclass(frozen=True)
class CertAuthority:
    ca_pem: Path
    cert: Path
    key: Path

    @property
    def pem(self) -> str:
        return self.ca_pem.read_text()


def make_ca(directory: Path, names: tuple[str, ...] = ("localhost",),
            addresses: tuple[str, ...] = ("127.0.0.1",)) -> CertAuthority:
    """A CA and a server certificate it signed for ``names`` and ``addresses``."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
            "-days", "2", "-subj", "/CN=Vigil egress test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", f"/CN={names[0]}")
    san = ",".join([*(f"DNS:{n}" for n in names), *(f"IP:{a}" for a in addresses)])
    (d / "ext.cnf").write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.pem"),
            "-days", "2", "-extfile", str(d / "ext.cnf"))
    return CertAuthority(ca_pem=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")


@dataclass
class WebServer:
    """A tiny HTTP/1.1 server: ``GET /`` answers BODY, ``GET /bytes/<n>`` n bytes, and it
    records each request's head (to see what the proxy sent)."""

    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    received: int = 0  # bytes of request heads read so far, finished or not
    server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                head += chunk
                self.received += len(chunk)
            self.heads.append(head)
            path = head.split(b" ", 2)[1]
            size = int(path.rsplit(b"/", 1)[1]) if path.startswith(b"/bytes/") else None
            length = len(BODY) if size is None else size
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % length)
            if size is None:
                writer.write(BODY)
            else:
                chunk = b"x" * 65536
                left = size
                while left > 0:
                    writer.write(chunk[:left])
                    left -= min(left, len(chunk))
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def web_server(ca: CertAuthority | None = None, host: str = "127.0.0.1"
                     ) -> AsyncIterator[WebServer]:
    """A WebServer on ``host`` (a free port): HTTPS with ``ca``'s certificate, else HTTP."""
    tls = None
    if ca is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(ca.cert, ca.key)
    web = WebServer()
    web.server = await asyncio.start_server(web.handle, host, 0, ssl=tls)
    web.port = web.server.sockets[0].getsockname()[1]
    try:
        yield web
    finally:
        web.server.close()

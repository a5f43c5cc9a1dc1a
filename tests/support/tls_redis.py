"""A TLS endpoint in front of the test Redis: a relay that ends TLS (a certificate for 127.0.0.1 from a throwaway CA,
a client certificate from it required) and passes the bytes to the real Redis, so a rediss:// URL's TLS parameters are
tried against a real server."""

from __future__ import annotations

import datetime
import ipaddress
import selectors
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA's certificate, the server's and the client's certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it, written to `folder`."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("govrag test CA", ca_key, ca_key, None, is_ca=True)
    files = TlsFiles(*(folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name, cert_path, key_path in (("server", files.server_cert, files.server_key),
                                      ("client", files.client_cert, files.client_key)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ca_key, ca_cert.subject, is_ca=False)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def _certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
                 issuer: x509.Name | None, *, is_ca: bool) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


# A client's handshake, and each read and write, gives up after this; an idle connection looks at whether the relay
# is closing each _POLL_SECONDS, so closing it never waits on a client.
_IO_SECONDS = 5.0
_POLL_SECONDS = 0.1


class _Relay(socketserver.BaseRequestHandler):
    """One client: TLS ended here, its bytes passed to Redis and Redis's back, until either side closes or the relay
    does."""

    server: _TlsRelayServer

    def handle(self) -> None:
        self.request.settimeout(_IO_SECONDS)  # a client that connects and never finishes its handshake
        try:
            with self.server.context.wrap_socket(self.request, server_side=True) as tls, \
                    socket.create_connection(self.server.target, timeout=_IO_SECONDS) as plain:
                peer = {tls: plain, plain: tls}
                with _watching(peer) as watcher:
                    while not self.server.closing.is_set():
                        # decrypted bytes already read off the socket are not seen by the selector
                        readable = [tls] if tls.pending() else [key.fileobj for key, _ in
                                                                 watcher.select(_POLL_SECONDS)]
                        for source in readable:
                            data = source.recv(65536)
                            if not data:
                                return
                            peer[source].sendall(data)
        except OSError:  # a client refusing the handshake, gone, or stalled
            return


@contextmanager
def _watching(sockets: dict[socket.socket, socket.socket]) -> Iterator[selectors.BaseSelector]:
    """A selector (epoll here) over `sockets`' reads: select.select refuses a descriptor numbered 1024 or more, which a
    long test run in one process reaches."""
    watcher = selectors.DefaultSelector()
    try:
        for sock in sockets:
            watcher.register(sock, selectors.EVENT_READ)
        yield watcher
    finally:
        watcher.close()


class _TlsRelayServer(socketserver.ThreadingTCPServer):
    """Closing it (server_close) waits for each client's thread, which ends once `closing` is set."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, context: ssl.SSLContext, target: tuple[str, int]) -> None:
        super().__init__((LOOPBACK, 0), _Relay)
        self.context, self.target, self.closing = context, target, threading.Event()


@contextmanager
def tls_redis(files: TlsFiles, target: tuple[str, int], *, client_certificate: bool = True) -> Iterator[int]:
    """A TLS endpoint on 127.0.0.1 in front of the Redis at `target`, requiring a client certificate from the CA
    unless `client_certificate` is false; yields its port. On leaving, every connection through it is closed and
    its thread ended."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files.ca)
    context.load_cert_chain(files.server_cert, files.server_key)
    context.verify_mode = ssl.CERT_REQUIRED if client_certificate else ssl.CERT_NONE
    server = _TlsRelayServer(context, target)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": _POLL_SECONDS})
    serving.start()
    try:
        yield server.server_address[1]
    finally:
        server.closing.set()
        server.shutdown()
        serving.join()
        server.server_close()  # joins the clients' threads

"""The gRPC transport between deployed parties: one generic bidirectional-streaming method over raw bytes
(no protoc step), each frame of a message (clouds/wire.py) its own gRPC message, optional mutual TLS
beneath the app-level seal.

    server  serve(host, port, handle, ...)      handle(request frames, peer) -> reply frames
    client  Connection(target, ...).exchange(frames, reply_bytes) -> reply frames

Every call has a deadline that grows with the bytes it moves (transport.deadline_s + bytes /
transport.min_rate_mbps); a call that cannot reach the peer is retried deploy.retries times with
doubling back-off, then `Unreachable` says where and how long it tried. A peer that refuses a message
answers with a gRPC status and a one-line reason, raised here as `Refused`.
"""
from __future__ import annotations

import logging
import socket
import time
from concurrent import futures
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import grpc

from fedjax_llm.config import DeployConfig, TransportConfig
from fedjax_llm.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE, METHOD = "fedjax_llm.Deploy", "Exchange"
PATH = f"/{SERVICE}/{METHOD}"
FRAME_SLACK = 1 << 16   # header, index and tag bytes around a chunk
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TransportError(UserError, RuntimeError):
    """A peer that cannot be reached or listened for; names the address and the config key."""


class Unreachable(TransportError):
    """No answer after deploy.retries attempts."""


class Refused(RuntimeError):
    """The peer answered with an error status: it refused the message (the reason is its message)."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(f"{code.name}: {reason}")
        self.code, self.reason = code, reason


def _options(chunk_bytes: int) -> list[tuple[str, int]]:
    frame = int(chunk_bytes) + FRAME_SLACK
    return [("grpc.max_send_message_length", frame), ("grpc.max_receive_message_length", frame),
            ("grpc.so_reuseport", 0), ("grpc.keepalive_time_ms", 20000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


def deadline(t: TransportConfig, nbytes: float) -> float:
    """Seconds a call moving `nbytes` may take."""
    return t.deadline_s + 8.0 * nbytes / (t.min_rate_mbps * 1e6)


def serve(host: str, port: int, handle: Callable[[Iterator[bytes], str], Iterable[bytes]], *, chunk_bytes: int,
          tls: Optional[tuple[bytes, bytes, bytes]] = None, workers: int = 16) -> tuple[grpc.Server, int]:
    """Starts a server calling handle(request frames, peer) for each call; returns it and its port.
    A handler raising Refused answers with that status and reason."""

    def exchange(request_iterator, context):
        try:
            yield from handle(request_iterator, context.peer())
        except Refused as e:
            context.abort(e.code, e.reason)

    handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(exchange)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_options(chunk_bytes))
    server.add_generic_rpc_handlers((handler,))
    address = f"{host}:{port}"
    _check_free(host, port)  # before gRPC tries: its own failure also logs a line of its C core to stderr
    try:
        if tls is not None:
            ca, cert, key = tls
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        bound, why = 0, str(e).split(";")[0]
    else:
        why = ""
    if not bound:
        raise TransportError(f"deploy.port: cannot listen on {address} (in use, or not an address of this "
                             f"machine){': ' + why if why else ''}; choose another deploy.port or deploy.host")
    server.start()
    return server, bound


def _check_free(host: str, port: int) -> None:
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise TransportError(f"deploy.port: cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                                 "deploy.port or deploy.host") from None


class Connection:
    """A channel to the aggregator; `exchange` makes one call with retries and a size-grown deadline."""

    def __init__(self, target: str, transport: TransportConfig, deploy: DeployConfig, *, chunk_bytes: int,
                 tls: Optional[tuple[bytes, bytes, bytes]] = None, server_name: Optional[str] = None):
        self.target, self.transport, self.deploy = target, transport, deploy
        options = _options(chunk_bytes)
        if tls is not None:
            ca, cert, key = tls
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self._call = self.channel.stream_stream(PATH)

    def close(self) -> None:
        self.channel.close()

    def once(self, frames: Iterable[bytes], nbytes: float, consume: Callable[[Iterator[bytes]], T]) -> T:
        """One attempt: consume(the reply's frames, as they arrive); raises Refused (answered with an
        error) or grpc.RpcError (not reached)."""
        try:
            return consume(self._call(iter(frames), timeout=deadline(self.transport, nbytes)))
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            if code in RETRYABLE:
                raise
            raise Refused(code, e.details() if hasattr(e, "details") else str(e)) from None

    def exchange(self, make_frames: Callable[[], Iterable[bytes]], nbytes: float, what: str,
                 consume: Callable[[Iterator[bytes]], T], retries: Optional[int] = None) -> T:
        """Calls with fresh frames from `make_frames()` per attempt (each attempt is sealed anew, so a
        retry is never a replay) until one is answered; Unreachable after the attempts run out."""
        d = self.deploy
        attempts, wait, t0, last = retries or d.retries, d.backoff_s, time.monotonic(), None
        for attempt in range(attempts):
            try:
                return self.once(make_frames(), nbytes, consume)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}" if hasattr(e, "code") else str(e)
                if attempt + 1 < attempts:
                    log.debug("%s to %s: attempt %d failed (%s); retrying in %.1fs", what, self.target,
                              attempt + 1, last, wait)
                    time.sleep(wait)
                    wait = min(2 * wait, d.backoff_max_s)
        raise Unreachable(f"deploy.host/deploy.port: the aggregator at {self.target} did not answer {what} "
                          f"after {attempts} attempts over {time.monotonic() - t0:.1f}s (deploy.retries="
                          f"{attempts}, deploy.backoff_s={d.backoff_s}); last error: {last}")

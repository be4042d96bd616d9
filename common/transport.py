"""ZeroMQ endpoints of the data and control planes (design §5.4, §5.5, §8.1).

Topology: the learner binds a PULL socket (data: encoded trees) and a ROUTER socket (control:
`common.wire` messages); each actor connects a PUSH and a DEALER whose routing id is its actor id.

Delivery guarantee
* At most once, in order per actor. `ActorEndpoints.send_tree` returns True once the frame is
  queued in ZeroMQ, and False -- the frame was NOT queued, the caller still owns it -- when the
  queue stayed full for `timeout_s` (backpressure from the high-water marks: a slow learner
  slows its actors) or no learner connection was up (ZMQ_IMMEDIATE: frames are never parked
  in a pipe to a learner that is gone, or to one whose CURVE handshake failed). A full queue
  never drops a frame, and frames over
  `transport.max_message_bytes` are refused at send (ValueError) instead of being dropped by
  the receiver's ZMQ_MAXMSGSIZE. The seconds spent blocked are counted (`blocked_seconds`).
* A queued frame can still be lost when its connection dies with it in flight (learner crash,
  network cut), when `reconnect()` discards the queues, or when `close()` gives up after
  `transport.linger_s`. The learner finds such loss from each tree's sequence number and the
  heartbeats' `trees_sent` and grants those credits again (design §5.6), and trains each
  `tree_id` at most once.
* Control: `LearnerEndpoints.send_control` returns False for an actor that is not connected
  (ZMQ_ROUTER_MANDATORY) or whose queue stays full, rather than dropping the message.
* Hostile input: receiving never raises anything but `WireError` for bad bytes
  (multi-part frames included); the caller counts it by reason and carries on.

Security: with `transport.curve`, both sockets are CURVE servers and a ZAP authenticator
admits only the public keys in `curve_dir/actors/` (layout made by `generate_keys`). Binding a
non-loopback address without CURVE raises `TransportError` unless `transport.insecure`.
Every socket has a finite linger, so `close()` never hangs.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common.config import TransportConfig
from common.errors import ConfigError, PortInUse
from common.wire import WireError, WireLimits, decode_message, encode_message

_COPY_THRESHOLD = 64 * 2**10  # smaller frames are copied by pyzmq anyway


class TransportError(ConfigError):
    """A transport that cannot be set up as configured; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# keys and addresses
# ---------------------------------------------------------------------------------------------
def generate_keys(directory: str | Path, names: list[str]) -> dict[str, Path]:
    """CURVE key pairs for the learner and each actor name; -> name -> secret-key file.

    Layout: learner.key / learner.key_secret (kept if present), actors/<name>.key (the
    allow-list: public keys only), private/<name>.key_secret (+ .key; give each to its actor).
    """
    root = Path(directory)
    (root / "actors").mkdir(parents=True, exist_ok=True)
    (root / "private").mkdir(parents=True, exist_ok=True)
    out = {}
    if not (root / "learner.key_secret").exists():
        zmq.auth.create_certificates(str(root), "learner")
    out["learner"] = root / "learner.key_secret"
    for name in names:
        public, secret = zmq.auth.create_certificates(str(root / "private"), name)
        shutil.copyfile(public, root / "actors" / f"{name}.key")
        out[name] = Path(secret)
    for secret in out.values():
        os.chmod(secret, 0o600)
    return out


def _load_pair(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise TransportError(f"missing {what} key file {path}: create keys with common.transport.generate_keys")
    return zmq.auth.load_certificate(str(path))


def check_ports_free(ports: list[tuple[str, int, str]]) -> None:
    """PortInUse for the first (host, port, config key) that is taken (port 0 = ephemeral: skipped).

    Binds each port as its server will (SO_REUSEADDR, like ZeroMQ, the TCPStore and the HTTP
    server), then lets it go, so a process can say so before a slow start (a model load); errors
    other than EADDRINUSE are left to the real bind to report."""
    for host, port, key in ports:
        if not port:
            continue
        address = "" if host in ("*", "0.0.0.0") else host.strip("[]")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUse.at(host, port, key) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a hostname or '*': may resolve to anything
        return False


def tcp_endpoint(host: str, port: int) -> str:
    """'tcp://host:port'; port 0 -> '*' (an ephemeral port); IPv6 addresses in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port if port else '*'}"


def check_bind_allowed(cfg: TransportConfig) -> None:
    if not is_loopback(cfg.bind_host) and not cfg.curve and not cfg.insecure:
        raise TransportError(
            f"refusing to bind {cfg.bind_host!r} without authentication: enable CURVE "
            "(transport.curve=true, transport.curve_dir=<keys from generate_keys>), bind 127.0.0.1, "
            "or pass --insecure (transport.insecure=true) on a trusted network"
        )


# ---------------------------------------------------------------------------------------------
# shared socket setup
# ---------------------------------------------------------------------------------------------
class _Endpoints:
    def __init__(self, cfg: TransportConfig) -> None:
        self.cfg = cfg
        self.limits = WireLimits(max_bytes=cfg.max_message_bytes)
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._sockets: list[zmq.Socket] = []

    def _socket(self, kind: int, curve: dict[str, Any] | None) -> zmq.Socket:
        cfg = self.cfg
        sock = self._ctx.socket(kind)
        self._sockets.append(sock)
        sock.setsockopt(zmq.LINGER, int(cfg.linger_s * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(cfg.heartbeat_interval_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(cfg.peer_timeout_s * 1000))
        if ":" in (cfg.bind_host + cfg.learner_host):
            sock.setsockopt(zmq.IPV6, 1)
        for option, value in (curve or {}).items():
            sock.setsockopt(option, value)
        return sock

    def _close_socket(self, sock: zmq.Socket, linger_ms: int | None = None) -> None:
        if sock in self._sockets:
            self._sockets.remove(sock)
        sock.close(linger=linger_ms)

    def close(self) -> None:
        """Close sockets (each waits at most transport.linger_s), stop the authenticator."""
        for sock in list(self._sockets):
            self._close_socket(sock)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_frames(sock: zmq.Socket, timeout_s: float | None, copy: bool) -> list | None:
    try:  # a message already queued needs no poll (the ingest loop's common case under load)
        return sock.recv_multipart(zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        pass
    timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    try:
        return sock.recv_multipart(zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        return None


def _send_until(sock: zmq.Socket, frames: list, timeout_s: float) -> tuple[bool, float]:
    """Queue frames, waiting up to timeout_s for room; -> (queued, seconds blocked)."""
    copy = not all(isinstance(f, bytes) and len(f) >= _COPY_THRESHOLD for f in frames)
    try:
        sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        return True, 0.0
    except zmq.Again:
        pass
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, time.monotonic() - t0
        sock.poll(max(1, int(remaining * 1000)), zmq.POLLOUT)
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
            return True, time.monotonic() - t0
        except zmq.Again:
            continue


# ---------------------------------------------------------------------------------------------
# learner
# ---------------------------------------------------------------------------------------------
class LearnerEndpoints(_Endpoints):
    """PULL (trees) + ROUTER (control), bound; `.data_endpoint` / `.control_endpoint` as bound."""

    def __init__(self, cfg: TransportConfig) -> None:
        check_bind_allowed(cfg)
        super().__init__(cfg)
        try:
            curve = self._start_curve() if cfg.curve else None
            self._data = self._socket(zmq.PULL, curve)
            self._data.setsockopt(zmq.RCVHWM, cfg.recv_hwm)
            self._control = self._socket(zmq.ROUTER, curve)
            self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> error, not a drop
            self._control.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting actor takes its id back
            self.data_endpoint = self._bind(self._data, cfg.data_port, "transport.data_port")
            self.control_endpoint = self._bind(self._control, cfg.control_port, "transport.control_port")
        except BaseException:
            self.close()
            raise

    def _start_curve(self) -> dict[int, Any]:
        root = Path(self.cfg.curve_dir or "")
        allow = root / "actors"
        if not allow.is_dir() or not any(allow.glob("*.key")):
            raise TransportError(f"CURVE allow-list {allow} holds no actor public keys: run generate_keys")
        public, secret = _load_pair(root / "learner.key_secret", "learner secret")
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(allow))
        return {zmq.CURVE_SERVER: 1, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}

    def _bind(self, sock: zmq.Socket, port: int, key: str) -> str:
        try:
            sock.bind(tcp_endpoint(self.cfg.bind_host, port))
        except zmq.ZMQError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse.at(self.cfg.bind_host, port, key) from None
            raise TransportError(f"cannot bind {self.cfg.bind_host}:{port} ({key}): {e}; "
                                 "check transport.bind_host, pick another port or 0") from None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def data_port(self) -> int:
        return int(self.data_endpoint.rsplit(":", 1)[1])

    @property
    def control_port(self) -> int:
        return int(self.control_endpoint.rsplit(":", 1)[1])

    def endpoints(self) -> dict[str, str]:
        return {"data": self.data_endpoint, "control": self.control_endpoint}

    def recv_tree(self, timeout_s: float | None, *, copy: bool = True) -> bytes | memoryview | None:
        """One encoded tree, or None after timeout_s (None: wait forever).

        copy=False returns a zero-copy memoryview of the received frame. A multi-part
        message is refused with WireError('malformed')."""
        frames = _recv_frames(self._data, timeout_s, copy)
        if frames is None:
            return None
        if len(frames) != 1:
            raise WireError("malformed", f"data message has {len(frames)} parts, expected 1")
        return frames[0] if copy else frames[0].buffer

    def recv_control(self, timeout_s: float | None) -> tuple[bytes, Any] | None:
        """(actor identity, validated message), or None after timeout_s.

        Raises WireError for a bad message; the error carries `.identity` of the sender."""
        frames = _recv_frames(self._control, timeout_s, True)
        if frames is None:
            return None
        identity = frames[0]
        try:
            if len(frames) != 2:
                raise WireError("malformed", f"control message has {len(frames) - 1} parts, expected 1")
            return identity, decode_message(frames[1], limits=self.limits)
        except WireError as e:
            e.identity = identity
            raise

    def send_control(self, identity: bytes | str, msg: Any, timeout_s: float = 1.0) -> bool:
        """Queue msg to one actor; False if it is not connected or its queue stays full."""
        ident = identity.encode() if isinstance(identity, str) else identity
        try:
            ok, _ = _send_until(self._control, [ident, encode_message(msg)], timeout_s)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise
        return ok


# ---------------------------------------------------------------------------------------------
# actor
# ---------------------------------------------------------------------------------------------
class ActorEndpoints(_Endpoints):
    """PUSH (trees) + DEALER (control, routing id = actor id), connected to the learner."""

    def __init__(
        self,
        cfg: TransportConfig,
        actor_id: str,
        *,
        data_endpoint: str | None = None,
        control_endpoint: str | None = None,
    ) -> None:
        ident = actor_id.encode()
        if not 1 <= len(ident) <= 255 or ident.startswith(b"\0"):
            raise ValueError(f"actor id {actor_id!r} must be 1-255 bytes and not start with NUL")
        super().__init__(cfg)
        self.actor_id = actor_id
        self.data_endpoint = data_endpoint or self._default_endpoint(cfg.data_port, "data_port")
        self.control_endpoint = control_endpoint or self._default_endpoint(cfg.control_port, "control_port")
        self.trees_sent = 0
        self.send_timeouts = 0
        self.blocked_seconds = 0.0
        try:
            self._curve = self._client_curve() if cfg.curve else None
            self._connect()
        except BaseException:
            self.close()
            raise

    def _default_endpoint(self, port: int, name: str) -> str:
        if port == 0:
            raise TransportError(
                f"transport.{name} is 0 (ephemeral): pass the learner's bound endpoints "
                "(from its endpoints.json) as data_endpoint/control_endpoint"
            )
        return tcp_endpoint(self.cfg.learner_host, port)

    def _client_curve(self) -> dict[int, Any]:
        root = Path(self.cfg.curve_dir or "")
        server_public, _ = _load_pair(root / "learner.key", "learner public")
        name = self.cfg.curve_key_name or self.actor_id
        public, secret = _load_pair(root / "private" / f"{name}.key_secret", f"actor {name!r} secret")
        return {zmq.CURVE_SERVERKEY: server_public, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}

    def _connect(self) -> None:
        self._data = self._socket(zmq.PUSH, self._curve)
        self._data.setsockopt(zmq.SNDHWM, self.cfg.send_hwm)
        # queue only on a live connection: with the learner away, send_tree blocks and times
        # out (the actor knows the tree was not handed over) instead of piling frames into a
        # pipe that reconnect() would discard unseen
        self._data.setsockopt(zmq.IMMEDIATE, 1)
        self._control = self._socket(zmq.DEALER, self._curve)
        self._control.setsockopt(zmq.ROUTING_ID, self.actor_id.encode())
        # no parking either: a Register queued while the learner is away would arrive, with
        # every retry, at the next learner (one registration each)
        self._control.setsockopt(zmq.IMMEDIATE, 1)
        self._data.connect(self.data_endpoint)
        self._control.connect(self.control_endpoint)

    def reconnect(self, data_endpoint: str | None = None, control_endpoint: str | None = None) -> None:
        """Fresh sockets (to new endpoints if given); frames still queued are discarded. Like every
        socket call, only from the one thread that uses this object's sockets."""
        self._close_socket(self._data, 0)
        self._close_socket(self._control, 0)
        self.data_endpoint = data_endpoint or self.data_endpoint
        self.control_endpoint = control_endpoint or self.control_endpoint
        self._connect()

    def send_tree(self, buf: bytes, timeout_s: float) -> bool:
        """Queue one encoded tree; False (not queued) if the queue stayed full, or no learner
        connection was up, for timeout_s."""
        if len(buf) > self.cfg.max_message_bytes:
            raise ValueError(
                f"tree frame of {len(buf)} bytes exceeds transport.max_message_bytes="
                f"{self.cfg.max_message_bytes}: the learner would drop it; raise the limit on both sides"
            )
        ok, blocked = _send_until(self._data, [buf], timeout_s)
        self.blocked_seconds += blocked
        if ok:
            self.trees_sent += 1
        else:
            self.send_timeouts += 1
        return ok

    def send_control(self, msg: Any, timeout_s: float = 1.0) -> bool:
        """Queue one control message; False if the queue stayed full for timeout_s."""
        ok, _ = _send_until(self._control, [encode_message(msg)], timeout_s)
        return ok

    def recv_control(self, timeout_s: float | None) -> Any | None:
        """The next validated message from the learner, or None after timeout_s."""
        frames = _recv_frames(self._control, timeout_s, True)
        if frames is None:
            return None
        if len(frames) != 1:
            raise WireError("malformed", f"control message has {len(frames)} parts, expected 1")
        return decode_message(frames[0], limits=self.limits)

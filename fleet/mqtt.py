"""The one MQTT adapter: paho-mqtt 2.x, MQTT 5 over TLS with a client certificate.

Everything else in the project speaks :class:`~fleet.messages.Outgoing` and
:class:`~fleet.messages.Incoming` through :class:`MqttClient`; this is the only module that
imports paho.

Lifecycle: :meth:`MqttClient.start` starts paho's network thread, which connects and, whenever the
connection drops or an attempt fails, waits an exponential backoff with full jitter
(``uniform(min, min(max, min * 2**attempt))``, set through ``reconnect_delay_set`` before each wait)
and connects again, until :meth:`MqttClient.close`. The backoff resets once a connection has been
accepted. The session is persistent
(``clean_start=False`` + session expiry) so the broker keeps subscriptions and queued QoS 1
messages across short outages; subscriptions are nevertheless renewed on every connect, because a
restarted broker without persistence has forgotten them.

Invariants:
- paho's callbacks run on its network thread; each one only copies data and hands it to the
  asyncio loop with ``call_soon_threadsafe``. Futures and handlers are touched only on the loop.
- A publish is registered under its message id on the loop right after ``publish()`` returns and
  before the coroutine yields, so an acknowledgement (dispatched through the loop) always finds it.
- Every acknowledgement is awaited with a timeout; paho return codes and MQTT 5 reason codes
  >= 0x80 become :mod:`agent.sync.errors` exceptions; nothing from paho escapes this module.
- :attr:`MqttClient.is_connected` becomes true only after the subscriptions are renewed, so a
  request published as soon as the client reports "connected" cannot miss its reply.
- Handlers are called on the loop in arrival order; an exception in one is logged, never kills the
  network thread.
- A QoS 1 message is acknowledged to the broker (PUBACK) exactly once per delivery. By default
  (``subscribe(..., ack="received")``) that is as soon as it arrives, before any handler runs (the
  behaviour of paho's automatic acks). A subscription made with ``ack="handled"`` defers it: a
  message matching such a subscription is acknowledged only when every matching handler has
  returned (an async handler: its coroutine finished) or raised (logged: a message whose handler
  fails is not held, since an un-acked message occupies one of the broker's in-flight slots for
  this client until it reconnects). If the process dies first, the broker still holds the message
  and delivers it again when the same session (client id) reconnects. A deferred ack is sent only
  on the connection the message arrived on (:attr:`MqttClient.acks_stale` counts those dropped):
  after a reconnect the broker re-sends un-acked messages itself, and an old message id on a new
  connection could name another message.
- The client certificate's private key is loaded only from a regular file that neither group nor
  others may read or write (:func:`check_private_key`, :class:`~fleet.errors.InsecureKeyFile`
  otherwise), the rule the hub applies to its signing keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet.errors import (
    AckTimeout,
    InsecureKeyFile,
    MqttError,
    NotConnected,
    PublishRefused,
    SubscribeRefused,
)
from fleet.log import get_logger
from fleet.messages import Incoming, Outgoing

log = get_logger(__name__)

Handler = Callable[[Incoming], Awaitable[None] | None]

AckMode = Literal["received", "handled"]
"""When a subscription's QoS 1 messages are acknowledged to the broker: ``received`` (on arrival,
the default) or ``handled`` (after the handler finished; module docstring)."""
ACK_MODES: tuple[str, ...] = ("received", "handled")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """Where and who: broker address, TLS material, identity and timing."""

    host: str
    port: int
    client_id: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0
    ack_timeout_s: float = 30.0
    will: Outgoing | None = None
    receive_maximum: int = 64
    max_inflight: int = 64
    max_queued: int = 0
    """Messages paho may buffer while disconnected; 0 = unbounded."""
    tls_server_name: str | None = None


def backoff_delay(attempt: int, lo: float, hi: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter; ``attempt`` counts from 0."""
    ceiling = min(hi, lo * (2 ** min(attempt, 30)))
    return lo + (ceiling - lo) * rand() if ceiling > lo else lo


def _reason_value(rc: Any) -> int:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, MQTTErrorCode):
        return int(rc.value)
    return int(rc)


def _user_props(props: Properties | None) -> tuple[tuple[str, str], ...]:
    pairs = getattr(props, "UserProperty", None) if props is not None else None
    return tuple((str(k), str(v)) for k, v in pairs) if pairs else ()


@dataclass(frozen=True, slots=True)
class Left:
    """What :meth:`MqttClient.leave` did."""

    handled: int
    """Messages that arrived while leaving (the session's kept and queued ones)."""
    complete: bool
    """True when they went quiet before the timeout."""


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    handler: Handler
    no_local: bool = False
    ack: AckMode = "received"
    joined: bool = True
    """False once :meth:`MqttClient.leave` left it at the broker: not renewed on reconnect, its
    handler still routes what the session was given before."""


@dataclass(frozen=True, slots=True)
class _AckToken:
    """A received QoS >= 1 message whose PUBACK waits for its handlers."""

    mid: int
    qos: int
    generation: int


@dataclass
class _Waiters:
    publish: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    early_publish: dict[int, int] = field(default_factory=dict)
    sub: dict[int, asyncio.Future[list[int]]] = field(default_factory=dict)
    early_sub: dict[int, list[int]] = field(default_factory=dict)


class _PahoClient(paho.Client):
    """paho's client, except that a socket whose TLS handshake fails is closed at once (paho
    2.1 leaves it to the garbage collector: a ``ResourceWarning`` and a descriptor held until
    then, once per failed attempt while a broker starts or stops)."""

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        ctx = self._ssl_context
        if ctx is None or not ctx.check_hostname:  # not how MqttClient sets TLS up: paho's way
            return super()._ssl_wrap_socket(tcp_sock)
        ssl_sock = ctx.wrap_socket(tcp_sock, server_hostname=self._host, do_handshake_on_connect=False)
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()  # the host name is checked here (check_hostname)
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock


def paho_client(c: MqttConfig, *, manual_ack: bool = False) -> paho.Client:
    """A paho MQTT 5 client set up from ``c``: TLS 1.2+ with the client certificate (its key checked
    by :func:`check_private_key`), the in-flight and queue bounds, the Last Will. Callbacks and the
    connection are the caller's (:class:`MqttClient`; the fleet simulator's one-loop client)."""
    check_private_key(c.key_file)
    client = _PahoClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=c.client_id,
        protocol=paho.MQTTv5,
        manual_ack=manual_ack,
    )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(c.ca_file))
    ctx.load_cert_chain(str(c.cert_file), str(c.key_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    client.tls_set_context(ctx)
    client.max_inflight_messages_set(c.max_inflight)
    client.max_queued_messages_set(c.max_queued)
    if c.will is not None:
        client.will_set(c.will.topic, c.will.payload, c.will.qos, c.will.retain)
    return client


def connect_properties(c: MqttConfig) -> Properties:
    """CONNECT properties: the session expiry and the receive maximum (the session is persistent,
    ``clean_start=False``, module docstring)."""
    props = _properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = c.session_expiry_s
    props.ReceiveMaximum = c.receive_maximum
    return props


class MqttClient:
    """An asyncio MQTT 5 client with its own reconnect loop. One per process identity."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = self._make_client()
        self._subs: dict[str, _Subscription] = {}
        self._waiters = _Waiters()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._closing = False
        self._started = False
        self._attempt = 0
        self._on_connect_hooks: list[Callable[[bool], Awaitable[None]]] = []
        self.connects = 0
        """How many times a connection was accepted (tests and metrics)."""
        self.last_error: str | None = None
        self._handled_filters: tuple[str, ...] = ()
        """Filters (``$share/`` stripped) of the ``ack="handled"`` subscriptions; replaced whole on
        the loop, read on the network thread."""
        self._ack_lock = threading.Lock()
        self._generation = 0
        """Bumped on every connect and disconnect (network thread, under ``_ack_lock``)."""
        self._handling: set[asyncio.Task[None]] = set()
        self.acks_deferred = 0
        """Messages acknowledged after their handlers (``ack="handled"``)."""
        self.acks_stale = 0
        """Deferred acks dropped because the connection they belonged to was gone."""
        self.dispatched = 0
        """Messages handed to handlers (or found unrouted), on the loop."""
        self._last_activity = 0.0
        """Loop time of the last message dispatched or deferred ack sent (:meth:`leave` waits for
        quiet: an ack frees an in-flight slot, for which the broker sends the next queued message)."""
        self.unrouted = 0
        """Messages that matched no subscription (a resumed session delivers what the broker kept
        right after CONNACK: call :meth:`subscribe` before :meth:`start` so it finds its handler)."""

    # --- construction --------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        # manual acks: _cb_message acks at once unless an ack="handled" subscription matches
        client = paho_client(self.config, manual_ack=True)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_connect_fail = self._cb_connect_fail
        client.on_message = self._cb_message
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_unsubscribe = self._cb_unsubscribe
        return client

    # --- paho thread -> loop ---------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(self, _c: Any, _u: Any, flags: Any, rc: Any, _props: Any) -> None:
        with self._ack_lock:
            self._generation += 1
        if _reason_value(rc) < 0x80:
            self._attempt = 0
        self._schedule_backoff()
        self._post(self._on_connected, _reason_value(rc), bool(getattr(flags, "session_present", False)))

    def _cb_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        with self._ack_lock:  # acks of messages from the lost connection are not sent any more
            self._generation += 1
        self._post(self._on_disconnected, _reason_value(rc))

    def _cb_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        incoming = Incoming(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            user=_user_props(props),
        )
        token: _AckToken | None = None
        if msg.qos > 0:
            if any(paho.topic_matches_sub(f, msg.topic) for f in self._handled_filters):
                token = _AckToken(int(msg.mid), int(msg.qos), self._generation)
            else:
                self._client.ack(msg.mid, msg.qos)
        self._post(self._dispatch, incoming, token)

    def _cb_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _props: Any) -> None:
        self._post(self._on_puback, mid, _reason_value(rc))

    def _cb_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[Any], _props: Any) -> None:
        self._post(self._on_suback, mid, [_reason_value(r) for r in rcs])

    def _cb_unsubscribe(self, _c: Any, _u: Any, mid: int, rcs: list[Any], _props: Any) -> None:
        self._post(self._on_suback, mid, [_reason_value(r) for r in rcs] or [0])

    # --- on the loop -----------------------------------------------------------------------------

    def _on_connected(self, rc: int, session_present: bool) -> None:
        if rc >= 0x80:
            self.last_error = f"connection refused by the broker (reason code {rc})"
            log.warning("mqtt_refused", reason_code=rc, client_id=self.config.client_id)
            return
        self.connects += 1
        self._disconnected.clear()
        log.info("mqtt_connected", client_id=self.config.client_id, session_present=session_present)
        loop = self._loop
        assert loop is not None
        loop.create_task(self._after_connect(session_present))

    async def _after_connect(self, session_present: bool) -> None:
        for sub in list(self._subs.values()):
            if not sub.joined:
                continue
            try:
                await self._subscribe_now(sub)
            except MqttError as exc:
                log.warning("mqtt_resubscribe_failed", topic=sub.topic_filter, error=str(exc))
        if self._disconnected.is_set():
            return
        # Only now is the client "connected" for its users: a request published from here on has
        # its reply subscription in place.
        self._connected.set()
        for hook in list(self._on_connect_hooks):
            try:
                await hook(session_present)
            except Exception as exc:  # a hook must not kill the connection handling
                log.warning("mqtt_connect_hook_failed", error=repr(exc))

    def _on_disconnected(self, rc: int) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._disconnected.set()
        if was:
            log.info("mqtt_disconnected", client_id=self.config.client_id, reason_code=rc)

    def _dispatch(self, msg: Incoming, token: _AckToken | None = None) -> None:
        assert self._loop is not None
        self.dispatched += 1
        self._last_activity = self._loop.time()
        deferred: list[Awaitable[None]] = []
        routed = False
        for sub in list(self._subs.values()):
            if paho.topic_matches_sub(_strip_share(sub.topic_filter), msg.topic):
                routed = True
                try:
                    result = sub.handler(msg)
                except Exception as exc:
                    log.warning("mqtt_handler_failed", topic=msg.topic, error=repr(exc))
                    continue
                if result is None:
                    continue
                if token is not None and sub.ack == "handled":
                    deferred.append(result)
                    continue
                assert self._loop is not None
                task = self._loop.create_task(_guard(result, msg.topic))
                _TASKS.add(task)
                task.add_done_callback(_TASKS.discard)
        if not routed:  # e.g. a resumed session's message before its subscribe() was called
            self.unrouted += 1
            log.warning("mqtt_message_unrouted", topic=msg.topic, client_id=self.config.client_id)
        if token is None:
            return
        if not deferred:
            self._ack(token)
            return
        assert self._loop is not None
        handling = self._loop.create_task(self._handle_then_ack(deferred, msg.topic, token))
        self._handling.add(handling)
        handling.add_done_callback(self._handling.discard)

    async def _handle_then_ack(self, results: list[Awaitable[None]], topic: str, token: _AckToken) -> None:
        try:
            for result in results:
                await _guard(result, topic)
        finally:
            self._ack(token)

    def _ack(self, token: _AckToken) -> None:
        """PUBACK a deferred message, only on the connection it arrived on (module docstring)."""
        if self._loop is not None:
            self._last_activity = self._loop.time()
        with self._ack_lock:
            if token.generation == self._generation:
                self._client.ack(token.mid, token.qos)
                self.acks_deferred += 1
                return
        self.acks_stale += 1
        log.info("mqtt_ack_stale", mid=token.mid, client_id=self.config.client_id)

    def _on_puback(self, mid: int, rc: int) -> None:
        fut = self._waiters.publish.pop(mid, None)
        if fut is None:
            self._waiters.early_publish[mid] = rc
        elif not fut.done():
            fut.set_result(rc)

    def _on_suback(self, mid: int, rcs: list[int]) -> None:
        fut = self._waiters.sub.pop(mid, None)
        if fut is None:
            self._waiters.early_sub[mid] = rcs
        elif not fut.done():
            fut.set_result(rcs)

    # --- supervisor ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once (the agent serves offline too).

        Subscriptions made before this are in place before any message is dispatched; with a
        persistent session the broker sends what it kept right after CONNACK, so a client that
        resumes one subscribes first (a message matching no subscription is acknowledged, counted
        in :attr:`unrouted` and logged)."""
        self._loop = asyncio.get_running_loop()
        if not self._started:
            self._started = True
            self._connect_async()

    def on_connect(self, hook: Callable[[bool], Awaitable[None]]) -> None:
        """Run ``hook(session_present)`` after every accepted connection (after resubscribing)."""
        self._on_connect_hooks.append(hook)

    def _connect_async(self) -> None:
        c = self.config
        self._schedule_backoff()
        self._client.connect_async(
            c.host, c.port, keepalive=c.keepalive_s, clean_start=False, properties=connect_properties(c)
        )
        self._client.loop_start()

    def _schedule_backoff(self) -> None:
        """Network thread: set paho's next reconnect wait to our jittered exponential delay."""
        c = self.config
        delay = backoff_delay(self._attempt, c.backoff_min_s, c.backoff_max_s)
        self._attempt += 1
        self._client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    def _cb_connect_fail(self, _c: Any, _u: Any) -> None:
        self._schedule_backoff()

    # --- public API ------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a connection; raise :class:`NotConnected` after ``timeout`` seconds."""
        if self._connected.is_set():
            return
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise NotConnected(
                f"not connected to {self.config.host}:{self.config.port}"
                + (f" ({self.last_error})" if self.last_error else "")
            ) from None

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    async def publish(self, msg: Outgoing, *, timeout: float | None = None) -> None:
        """Publish and, for QoS >= 1, wait for the broker's acknowledgement.

        Raises :class:`NotConnected` when not connected, :class:`PublishRefused` for a failure
        reason code (e.g. 0x87 not authorized), :class:`AckTimeout` when no ack arrives in time.
        """
        timeout = self.config.ack_timeout_s if timeout is None else timeout
        if not self._connected.is_set():
            raise NotConnected("not connected")
        props: Properties | None = None
        if msg.response_topic or msg.correlation or msg.user or msg.expiry_s is not None:
            props = _properties(PacketTypes.PUBLISH)
            if msg.response_topic:
                props.ResponseTopic = msg.response_topic
            if msg.correlation is not None:
                props.CorrelationData = msg.correlation
            if msg.user:
                props.UserProperty = list(msg.user)
            if msg.expiry_s is not None:
                props.MessageExpiryInterval = msg.expiry_s
        info = self._client.publish(msg.topic, msg.payload, msg.qos, msg.retain, props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {msg.topic} failed: {paho.error_string(info.rc)}")
        if msg.qos == 0:
            return
        rc = await self._wait_ack(info.mid, self._waiters.publish, self._waiters.early_publish, timeout)
        if rc >= 0x80:
            raise PublishRefused(f"publish to {msg.topic} refused (reason code {rc:#x})", reason_code=rc)

    def publish_nowait(self, msg: Outgoing) -> int:
        """Queue a publish without waiting for its ack; returns the message id (for pipelining).

        Use :meth:`wait_ack` to await it.
        """
        if not self._connected.is_set():
            raise NotConnected("not connected")
        props: Properties | None = None
        if msg.response_topic or msg.correlation or msg.user:
            props = _properties(PacketTypes.PUBLISH)
            if msg.response_topic:
                props.ResponseTopic = msg.response_topic
            if msg.correlation is not None:
                props.CorrelationData = msg.correlation
            if msg.user:
                props.UserProperty = list(msg.user)
        info = self._client.publish(msg.topic, msg.payload, msg.qos, msg.retain, props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {msg.topic} failed: {paho.error_string(info.rc)}")
        return int(info.mid)

    async def wait_ack(self, mid: int, timeout: float | None = None) -> None:
        """Await the acknowledgement of a :meth:`publish_nowait` message id."""
        timeout = self.config.ack_timeout_s if timeout is None else timeout
        rc = await self._wait_ack(mid, self._waiters.publish, self._waiters.early_publish, timeout)
        if rc >= 0x80:
            raise PublishRefused(f"publish refused (reason code {rc:#x})", reason_code=rc)

    async def _wait_ack(
        self,
        mid: int,
        waiting: dict[int, asyncio.Future[Any]],
        early: dict[int, Any],
        timeout: float,
    ) -> Any:
        if mid in early:
            return early.pop(mid)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting[mid] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AckTimeout(f"no acknowledgement of message {mid} within {timeout:g}s") from None
        finally:
            waiting.pop(mid, None)

    async def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        timeout: float | None = None,
        ack: AckMode = "received",
    ) -> None:
        """Subscribe (now if connected, and again after every reconnect) and route matches to handler.

        ``ack`` says when a QoS 1 message is acknowledged to the broker: ``"received"`` on arrival
        (at most once through this client if the process dies while handling it), ``"handled"``
        once the handler has finished (the broker delivers it again after a crash; a handler that
        holds a message also holds one of the broker's in-flight slots for this client, module
        docstring). Raises :class:`SubscribeRefused` when the broker refuses the filter,
        ValueError for an unknown ``ack``.
        """
        if ack not in ACK_MODES:
            raise ValueError(f"subscribe: ack must be one of {', '.join(ACK_MODES)}, not {ack!r}")
        sub = _Subscription(topic_filter, qos, handler, ack=ack)
        self._subs[topic_filter] = sub
        self._update_handled_filters()
        if self._connected.is_set():
            try:
                await self._subscribe_now(sub, timeout)
            except SubscribeRefused:
                self._subs.pop(topic_filter, None)
                self._update_handled_filters()
                raise

    def _update_handled_filters(self) -> None:
        self._handled_filters = tuple(
            _strip_share(s.topic_filter) for s in self._subs.values() if s.ack == "handled"
        )

    async def _subscribe_now(self, sub: _Subscription, timeout: float | None = None) -> None:
        timeout = self.config.ack_timeout_s if timeout is None else timeout
        options = SubscribeOptions(qos=sub.qos)
        rc, mid = self._client.subscribe(sub.topic_filter, options=options)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"subscribe to {sub.topic_filter} failed: {paho.error_string(rc)}")
        codes = await self._wait_ack(mid, self._waiters.sub, self._waiters.early_sub, timeout)
        bad = [c for c in codes if c >= 0x80]
        if bad:
            raise SubscribeRefused(
                f"subscription to {sub.topic_filter} refused (reason code {bad[0]:#x})", reason_code=bad[0]
            )

    async def unsubscribe(self, topic_filter: str, *, timeout: float | None = None) -> None:
        self._subs.pop(topic_filter, None)
        self._update_handled_filters()
        if not self._connected.is_set():
            return
        timeout = self.config.ack_timeout_s if timeout is None else timeout
        rc, mid = self._client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return
        await self._wait_ack(mid, self._waiters.sub, self._waiters.early_sub, timeout)

    async def leave(self, *, quiet_s: float = 0.5, timeout: float = 30.0) -> Left:
        """Leave every subscription at the broker and handle what this session was already given.

        Each filter is unsubscribed at the broker, so from then on the broker gives new messages
        to a shared group's other members (and sends this session no plain ones); the handlers
        stay: the messages the broker had already assigned to this session (in flight or queued:
        Mosquitto still delivers a session's queue after UNSUBSCRIBE) are handled and acknowledged
        as before. Returns once for ``quiet_s`` no message has arrived and no deferred ack was sent
        (an ack lets the broker send the next queued message) and none is being handled
        (``complete``), or at ``timeout``: what is left then stays with the session while it lives
        (delivered when the same client id connects again; ended, its senders re-send after their
        ack timeout). A reconnect meanwhile does not subscribe again.
        """
        loop = asyncio.get_running_loop()
        started, before = loop.time(), self.dispatched
        deadline = started + timeout
        for sub in [s for s in self._subs.values() if s.joined]:
            sub.joined = False
            if not self._connected.is_set():
                continue
            rc, mid = self._client.unsubscribe(sub.topic_filter)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                continue
            with contextlib.suppress(MqttError):
                await self._wait_ack(
                    mid, self._waiters.sub, self._waiters.early_sub, max(0.1, deadline - loop.time())
                )
        self._last_activity = max(self._last_activity, loop.time())
        complete = False
        while loop.time() < deadline:
            if self._handling:
                await asyncio.wait(set(self._handling), timeout=max(0.0, deadline - loop.time()))
                continue
            idle = loop.time() - self._last_activity
            if idle >= quiet_s:
                complete = True
                break
            await asyncio.sleep(min(quiet_s - idle, max(0.0, deadline - loop.time())) + 0.001)
        left = Left(self.dispatched - before, complete)
        log.info(
            "mqtt_left",
            client_id=self.config.client_id,
            handled=left.handled,
            complete=complete,
            seconds=round(loop.time() - started, 3),
        )
        return left

    async def close(self, *, timeout: float = 5.0, end_session: bool = False) -> None:
        """Disconnect cleanly (no Last Will is published) and stop the network thread.

        ``end_session`` asks the broker to discard this client's session now (MQTT 5 DISCONNECT with
        session expiry 0): a hub worker that leaves must not keep receiving its share of requests.
        """
        self._closing = True
        if self._handling and self._connected.is_set():
            # messages being handled are acknowledged before the session may end
            await asyncio.wait(set(self._handling), timeout=timeout)
        if self._connected.is_set():
            props = None
            if end_session and self.config.session_expiry_s:
                props = _properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), timeout)
        else:
            self._client.disconnect()
        self._connected.clear()
        self._disconnected.set()
        if self._started:
            await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)
        pending: list[asyncio.Future[Any]] = [*self._waiters.publish.values(), *self._waiters.sub.values()]
        for fut in pending:
            if not fut.done():
                fut.set_exception(NotConnected("client closed"))


def _properties(kind: int) -> Properties:
    return Properties(kind)  # type: ignore[no-untyped-call]


def _strip_share(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


_TASKS: set[asyncio.Task[None]] = set()


async def _guard(result: Awaitable[None], topic: str) -> None:
    try:
        await result
    except Exception as exc:
        log.warning("mqtt_handler_failed", topic=topic, error=repr(exc))


def check_private_key(path: Path) -> None:
    """Refuse a private key file that is not a regular file or that group or others may read or
    write (mode & 0o077). ``stat`` follows a symlink (systemd's ``LoadCredential=`` hands over a
    0400 copy owned by the service user, which passes)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InsecureKeyFile(f"key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InsecureKeyFile(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise InsecureKeyFile(
            f"key file {path} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); make it 0600 and owned by the service user, "
            "or pass it with systemd LoadCredential="
        )


__all__ = [
    "ACK_MODES",
    "AckMode",
    "Handler",
    "Left",
    "MqttClient",
    "MqttConfig",
    "backoff_delay",
    "check_private_key",
    "connect_properties",
    "paho_client",
]

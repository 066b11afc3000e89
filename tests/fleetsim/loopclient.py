"""An MQTT 5 client for many simulated boxes on one asyncio loop: paho in its external-loop mode.

:class:`fleet.mqtt.MqttClient` (what a real box runs) starts one paho network thread per
connection; a thousand of them fight over the GIL and their TLS handshakes time out under a
connect storm faster than they complete. Here paho runs without a thread: each socket is
registered with the asyncio loop (``add_reader`` / ``add_writer``), one task calls ``loop_misc``
(keepalive) for every client each second, and only the blocking part of a connection (TCP connect
and TLS handshake, paho's ``reconnect``) runs in a small shared thread pool. The API is the subset
of :class:`~fleet.mqtt.MqttClient` the simulator uses, with the same semantics: persistent
sessions, subscriptions renewed (in one SUBSCRIBE) before the client counts as connected, every
QoS 1 publish awaited with a timeout, reason codes >= 0x80 raised, reconnect with exponential
backoff and full jitter (:func:`fleet.mqtt.backoff_delay`).

Invariant: after ``connect``/``reconnect`` returns in the pool, paho is touched only on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet.errors import AckTimeout, MqttError, NotConnected, PublishRefused, SubscribeRefused
from fleet.messages import Incoming, Outgoing
from fleet.mqtt import MqttConfig, backoff_delay, connect_properties, paho_client

Handler = Callable[[Incoming], Awaitable[None] | None]
CONNECTORS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fleetsim-connect")
_CLIENTS: weakref.WeakSet[LoopClient] = weakref.WeakSet()
_MISC: asyncio.Task[None] | None = None
_TASKS: set[asyncio.Task[Any]] = set()


def _code(rc: Any) -> int:
    return int(getattr(rc, "value", rc))


async def _misc() -> None:
    while True:
        await asyncio.sleep(1.0)
        for client in list(_CLIENTS):
            client._misc()


class LoopClient:
    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._hooks: list[Callable[[bool], Awaitable[None]]] = []
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._connected = asyncio.Event()
        self._closing = False
        self._attempt = 0
        self._sock: Any = None
        self.connects = 0
        self.last_error: str | None = None
        c = paho_client(config)
        c.connect_timeout = 60.0
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_ack
        c.on_subscribe = self._on_suback
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        self._c = c

    # --- sockets on the loop ---------------------------------------------------------------

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        self._soon(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        assert self._loop is not None
        self._sock = sock
        with contextlib.suppress(ValueError, OSError):
            self._loop.add_reader(sock, self._read)

    def _on_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        self._soon(self._remove, sock)

    def _remove(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._sock is sock:
            self._sock = None

    def _on_register_write(self, _c: Any, _u: Any, sock: Any) -> None:
        self._soon(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.add_writer(sock, self._write)

    def _on_unregister_write(self, _c: Any, _u: Any, sock: Any) -> None:
        self._soon(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _read(self) -> None:
        self._c.loop_read()
        sock = self._sock
        while sock is not None and getattr(sock, "pending", lambda: 0)():  # TLS-buffered bytes
            if self._c.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    def _write(self) -> None:
        self._c.loop_write()

    def _misc(self) -> None:
        if self._sock is not None:
            self._c.loop_misc()

    # --- paho callbacks (on the loop) ---------------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: Any, _props: Any) -> None:
        if _code(rc) >= 0x80:
            self.last_error = f"connection refused (reason code {_code(rc)})"
            return
        self._attempt = 0
        self.connects += 1
        self._task(self._after_connect(bool(getattr(flags, "session_present", False))))

    async def _after_connect(self, session_present: bool) -> None:
        if self._subs:
            topics = [(t, SubscribeOptions(qos=q)) for t, (q, _h) in self._subs.items()]
            rc, mid = self._c.subscribe(topics)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with contextlib.suppress(MqttError):
                    codes = await self._wait(mid, self.config.ack_timeout_s)
                    if any(c >= 0x80 for c in codes):
                        self.last_error = f"subscription refused {codes}"
        self._connected.set()
        for hook in list(self._hooks):
            with contextlib.suppress(Exception):
                await hook(session_present)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self._connected.clear()
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(NotConnected("connection lost"))
        self._acks.clear()
        if not self._closing:
            self._task(self._reconnect(later=True))

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        pairs = getattr(props, "UserProperty", None) if props is not None else None
        incoming = Incoming(
            topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            user=tuple((str(k), str(v)) for k, v in pairs) if pairs else (),
        )  # fmt: skip
        for topic, (_q, handler) in self._subs.items():
            if paho.topic_matches_sub(topic, msg.topic):
                result = handler(incoming)
                if result is not None:
                    self._task(result)

    def _on_ack(self, _c: Any, _u: Any, mid: int, rc: Any, _props: Any) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(_code(rc))

    def _on_suback(self, _c: Any, _u: Any, mid: int, rcs: list[Any], _props: Any) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([_code(r) for r in rcs])

    def _task(self, coro: Awaitable[Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    # --- connection ---------------------------------------------------------------------------

    async def start(self) -> None:
        global _MISC
        self._loop = asyncio.get_running_loop()
        _CLIENTS.add(self)
        if _MISC is None or _MISC.done():
            _MISC = self._loop.create_task(_misc())
        self._task(self._reconnect(later=False))

    async def _reconnect(self, *, later: bool) -> None:
        assert self._loop is not None
        c = self.config
        props = connect_properties(c)
        while not self._closing:
            if later or self._attempt:
                await asyncio.sleep(backoff_delay(self._attempt, c.backoff_min_s, c.backoff_max_s))
            later = False
            self._attempt += 1
            try:
                await self._loop.run_in_executor(
                    CONNECTORS,
                    lambda: self._c.connect(c.host, c.port, keepalive=c.keepalive_s, clean_start=False,
                                            properties=props),
                )  # fmt: skip
                return
            except (OSError, ssl.SSLError) as exc:
                self.last_error = str(exc)

    def on_connect(self, hook: Callable[[bool], Awaitable[None]]) -> None:
        self._hooks.append(hook)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise NotConnected(f"not connected ({self.last_error or 'no answer'})") from None

    async def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        self._subs[topic_filter] = (qos, handler)
        if self.is_connected:
            rc, mid = self._c.subscribe(topic_filter, options=SubscribeOptions(qos=qos))
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise NotConnected(f"subscribe to {topic_filter}: {paho.error_string(rc)}")
            codes = await self._wait(mid, self.config.ack_timeout_s)
            if any(code >= 0x80 for code in codes):
                raise SubscribeRefused(f"subscription to {topic_filter} refused", reason_code=codes[0])

    async def _wait(self, mid: int, timeout: float) -> Any:
        assert self._loop is not None
        fut = self._acks.setdefault(mid, self._loop.create_future())
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AckTimeout(f"no acknowledgement of message {mid} within {timeout:g}s") from None
        finally:
            self._acks.pop(mid, None)

    async def publish(self, msg: Outgoing, *, timeout: float | None = None) -> None:
        if not self.is_connected:
            raise NotConnected("not connected")
        props = None
        if msg.response_topic or msg.correlation is not None or msg.user:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if msg.response_topic:
                props.ResponseTopic = msg.response_topic
            if msg.correlation is not None:
                props.CorrelationData = msg.correlation
            if msg.user:
                props.UserProperty = list(msg.user)
        assert self._loop is not None
        # registered before paho can see the PUBACK (it is read on this loop, later)
        info = self._c.publish(msg.topic, msg.payload, msg.qos, msg.retain, props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {msg.topic} failed: {paho.error_string(info.rc)}")
        if msg.qos == 0:
            return
        rc = await self._wait(info.mid, self.config.ack_timeout_s if timeout is None else timeout)
        if rc >= 0x80:
            raise PublishRefused(f"publish to {msg.topic} refused (reason code {rc:#x})", reason_code=rc)

    async def close(self, *, timeout: float = 5.0) -> None:
        self._closing = True
        _CLIENTS.discard(self)
        if self.is_connected:
            self._c.disconnect()
            with contextlib.suppress(Exception):
                self._write()
        self._connected.clear()
        sock = self._sock
        if sock is not None:
            self._remove(sock)
            with contextlib.suppress(OSError):
                sock.close()


__all__ = ["CONNECTORS", "LoopClient"]

"""Errors of what agent and hub share on the wire (messages, the MQTT adapter, device keys).

    FleetError
    ├── MqttError            the broker connection or an MQTT operation failed
    │   ├── NotConnected     no connection within the wait (the agent keeps serving locally)
    │   ├── AckTimeout       PUBACK/SUBACK/UNSUBACK did not arrive in time
    │   ├── PublishRefused   the broker answered a publish with a failure reason code (e.g. ACL)
    │   └── SubscribeRefused the broker refused a subscription (reason code >= 0x80)
    ├── ProtocolError        a message does not have the shape docs/protocol.md defines
    ├── DeviceKeyError       a device key cannot be read, written or used (fleet.device_key)
    └── InsecureKeyFile      a TLS private key file is readable or writable by group or others

paho's return codes and reason codes are translated into these in :mod:`fleet.mqtt`, the only
importer of paho. The agent and the hub catch them beside their own error trees.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of the errors of the shared fleet library."""


class MqttError(FleetError):
    """An MQTT operation failed. ``reason_code`` is the MQTT 5 reason code when there is one."""

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class NotConnected(MqttError):
    """The client is not connected to the broker."""


class AckTimeout(MqttError):
    """An acknowledgement did not arrive within the timeout."""


class PublishRefused(MqttError):
    """The broker refused a publish (PUBACK reason code >= 0x80)."""


class SubscribeRefused(MqttError):
    """The broker refused a subscription (SUBACK reason code >= 0x80)."""


class ProtocolError(FleetError):
    """A message payload is malformed."""


class DeviceKeyError(FleetError):
    """A device key is missing, unreadable, malformed, or a signature does not verify."""


class InsecureKeyFile(FleetError):
    """A private key file that others than its owner may read or write (the MQTT identity must stay
    the service user's: anyone who reads it can connect to the broker as that device or hub)."""


__all__ = [
    "AckTimeout",
    "DeviceKeyError",
    "FleetError",
    "InsecureKeyFile",
    "MqttError",
    "NotConnected",
    "ProtocolError",
    "PublishRefused",
    "SubscribeRefused",
]

"""What the agent and the hub share on the wire: message types (:mod:`fleet.messages`), the MQTT
adapter (:mod:`fleet.mqtt`, the only importer of paho) and its errors (:mod:`fleet.errors`), the
audit chain format (:mod:`fleet.chain`) and device keys (:mod:`fleet.device_key`), log set-up
(:mod:`fleet.log`, the service name a parameter) and exit statuses (:mod:`fleet.exit_status`).

Imports ``registry`` only, never ``agent`` or ``hub``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

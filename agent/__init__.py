"""Edge Agent: the device daemon.

Probes the box, keeps a signed model registry, serves an OpenAI-compatible API over a Unix
socket, audits every action and syncs with a hub over MQTT when it can.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

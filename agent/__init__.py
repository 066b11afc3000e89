"""Edge Agent: the device daemon.

Probes the box, keeps a signed model registry, serves an OpenAI-compatible API over a Unix
socket, audits every action and syncs with a hub over MQTT when it can.
"""

from fleet import __version__

__all__ = ["__version__"]

"""The local API: OpenAI-compatible HTTP/1.1 over a Unix socket (aiohttp)."""

from agent.server.http import ApiServer, build_app
from agent.server.peercred import PeerCred, peer_credentials

__all__ = ["ApiServer", "PeerCred", "build_app", "peer_credentials"]

"""The rollout tests run against the same real parts as the sync tests: a real Mosquitto with the
shipped config, ACL and plugin, and certificates from :mod:`hub.sync.certs`."""

from __future__ import annotations

from tests.sync.conftest import broker, certdir, own_broker

__all__ = ["broker", "certdir", "own_broker"]

"""Serving a fleet over MQTT: metadata, blob chunks, audit and event collection, inventory, certificates."""

__all__: list[str] = []

"""Fleet sync over MQTT: the device side (see docs/protocol.md).

``messages`` (our own types and their bytes) and ``reconcile`` (desired vs installed) are pure;
``mqtt`` is the only module that imports paho; ``fetcher``, ``audit_upload`` and ``state`` are the
edges that move bytes between the broker and the registry store, the audit log and the inventory.
"""

__all__: list[str] = []

"""Fleet sync over MQTT: the device side (see docs/protocol.md).

``messages`` (our own types and their bytes) and ``reconcile`` (desired vs installed) are pure;
``mqtt`` is the only module that imports paho; ``fetcher`` (the registry's fetcher interface over
MQTT, resumable verified transfers), ``audit_upload`` and ``state`` move bytes between the broker
and the registry store, the audit log and the hub's inventory; ``service`` is the sync loop the
daemon starts when ``[hub] host`` is set; ``cli`` is ``edge-agent sync status``.
"""

__all__: list[str] = []

"""A simulated fleet: many boxes in one process speaking the device protocol (docs/protocol.md)."""

"""The fleet side: signs and publishes models and policies, serves them over MQTT."""

__all__: list[str] = []

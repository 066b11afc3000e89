"""The signed model registry: a TUF repository of models, policies and deployments."""

__all__: list[str] = []

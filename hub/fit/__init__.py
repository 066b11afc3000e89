"""Fit checked before a push: whether a model fits the boxes the hub knows."""

__all__: list[str] = []

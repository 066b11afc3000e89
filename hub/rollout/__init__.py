"""Staged rollouts: waves of a group's boxes move to a model version, gated on the health they report."""

__all__: list[str] = []

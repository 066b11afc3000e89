"""The repository commands of `edge-hub` (init, model, policy, deployment, bundle, keys)."""

__all__: list[str] = []

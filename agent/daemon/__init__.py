"""The running daemon: :mod:`agent.daemon.app` builds and connects every object (the only place that
does) and owns the lifecycle; beside it the parts only the daemon uses: reload, the selection's
re-probe, the scheduler, sd_notify, metrics, the model catalog, the crash-isolation trial child."""

__all__: list[str] = []

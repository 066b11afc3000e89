"""Ed25519 signing keys of a hub repository, stored as PEM files.

Invariants: every private key file is created with mode 0600 (never wider, not even briefly: the
file is opened with ``O_CREAT|O_EXCL`` and mode 0600) inside a 0700 directory, named by its keyid;
when a passphrase is given the PEM is encrypted (PKCS#8 with the best available encryption). Key
pairs come from securesystemslib's :class:`CryptoSigner`; nothing here implements cryptography.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from securesystemslib.signer import CryptoSigner, SSlibKey

from registry.exceptions import RepositoryError

_KEYID = re.compile(r"[0-9a-f]{64}")
MAX_KEY_FILE_BYTES = 64 << 10


def generate() -> CryptoSigner:
    """A new Ed25519 key pair."""
    return CryptoSigner.generate_ed25519()


def passphrase_from_env(var: str | None, env: Mapping[str, str] | None = None) -> bytes | None:
    """The passphrase in environment variable ``var`` (None when ``var`` is None)."""
    if var is None:
        return None
    env = os.environ if env is None else env
    value = env.get(var)
    if not value:
        raise RepositoryError(f"environment variable {var} (the key passphrase) is not set or empty")
    return value.encode("utf-8")


class KeyStore:
    """Private keys in ``directory``, one ``<keyid>.pem`` per key."""

    def __init__(self, directory: Path, passphrase: bytes | None = None) -> None:
        self.directory = directory
        self.passphrase = passphrase

    def _path(self, keyid: str) -> Path:
        if not _KEYID.fullmatch(keyid):
            raise RepositoryError(f"bad keyid {keyid!r}")
        return self.directory / f"{keyid}.pem"

    def save(self, signer: CryptoSigner) -> Path:
        """Write the private key (0600, encrypted if a passphrase is set); refuse to overwrite.

        A failed write leaves no key file behind and raises :class:`RepositoryError`."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        except OSError as exc:
            raise RepositoryError(
                f"cannot create key directory {self.directory}: {exc.strerror or exc}"
            ) from None
        # CryptoSigner exports unencrypted PKCS#8 only: parse it back and re-encode (encrypted).
        key = load_pem_private_key(signer.private_bytes, None)
        encryption = BestAvailableEncryption(self.passphrase) if self.passphrase else NoEncryption()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
        path = self._path(signer.public_key.keyid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise RepositoryError(f"key file {path} already exists") from None
        except OSError as exc:
            raise RepositoryError(f"cannot write key file {path}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise RepositoryError(f"cannot write key file {path}: {exc.strerror or exc}") from None
        return path

    def has(self, keyid: str) -> bool:
        return self._path(keyid).is_file()

    def load(self, public_key: SSlibKey) -> CryptoSigner:
        """The signer for ``public_key``; raise :class:`RepositoryError` if missing or undecryptable."""
        path = self._path(public_key.keyid)
        try:
            st = path.stat()
            if st.st_mode & 0o077:
                raise RepositoryError(f"key file {path} is readable by others (mode {st.st_mode & 0o777:o})")
            with path.open("rb") as fh:
                pem = fh.read(MAX_KEY_FILE_BYTES + 1)
        except FileNotFoundError:
            raise RepositoryError(
                f"no private key for keyid {public_key.keyid[:12]}... in {self.directory}"
            ) from None
        except OSError as exc:
            raise RepositoryError(f"cannot read key file {path}: {exc.strerror or exc}") from None
        if len(pem) > MAX_KEY_FILE_BYTES:
            raise RepositoryError(f"key file {path} is too large")
        try:
            private = load_pem_private_key(pem, self.passphrase)
        except TypeError:
            raise RepositoryError(
                f"key file {path} is encrypted: give the passphrase (--passphrase-env)"
                if self.passphrase is None
                else f"key file {path} is not encrypted but a passphrase was given"
            ) from None
        except ValueError:
            raise RepositoryError(f"cannot decrypt key file {path}: wrong passphrase or not a key") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise RepositoryError(f"key file {path} is not an Ed25519 key")
        try:
            return CryptoSigner(private, public_key)
        except Exception as exc:
            raise RepositoryError(
                f"key file {path} does not match keyid {public_key.keyid[:12]}: {exc}"
            ) from None

    def retire(self, keyid: str) -> None:
        """Move a revoked key out of the signing set (kept under ``retired/`` for the record)."""
        path = self._path(keyid)
        if path.is_file():
            retired = self.directory / "retired"
            try:
                retired.mkdir(mode=0o700, exist_ok=True)
                os.replace(path, retired / path.name)
            except OSError as exc:
                raise RepositoryError(f"cannot retire key file {path}: {exc.strerror or exc}") from None


__all__ = ["MAX_KEY_FILE_BYTES", "KeyStore", "generate", "passphrase_from_env"]

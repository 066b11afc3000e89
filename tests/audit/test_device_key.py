"""The device Ed25519 key: created once, private, shared by racing processes, never replaced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.device_key import (
    KEY_FILE,
    PUB_FILE,
    DeviceKeyError,
    DevicePublicKey,
    ensure_device_key,
    keys_dir,
    load_device_key,
    load_public_key,
)


def test_generated_once_with_private_modes(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    directory = keys_dir(tmp_path)
    assert (directory / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / PUB_FILE).read_text().strip() == key.public.raw.hex()
    again = ensure_device_key(tmp_path)
    assert again.key_id == key.key_id
    assert sorted(p.name for p in directory.iterdir()) == sorted([KEY_FILE, PUB_FILE])  # no temp files left


def test_sign_and_verify(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    signature = key.sign(b"checkpoint")
    assert key.public.verify(signature, b"checkpoint")
    assert not key.public.verify(signature, b"checkpoint!")
    assert not key.public.verify(b"\x00" * 64, b"checkpoint")
    assert load_public_key(keys_dir(tmp_path) / PUB_FILE) == key.public
    assert load_public_key(keys_dir(tmp_path) / KEY_FILE) == key.public


RACE = """
import sys
from pathlib import Path
from fleet.device_key import ensure_device_key
print(ensure_device_key(Path(sys.argv[1])).key_id)
"""


def test_racing_processes_end_up_with_one_key(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert ids == {ensure_device_key(tmp_path).key_id}


def _ec_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "is not a PEM private key", id="empty"),
        pytest.param(
            b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n", "not a PEM", id="garbage"
        ),
        pytest.param(_ec_pem(), "is not an Ed25519 key", id="wrong-algorithm"),
        pytest.param(b"x" * (17 << 10), "larger than", id="too-large"),
    ],
)
def test_bad_key_file_is_refused_not_replaced(tmp_path: Path, content: bytes, message: str) -> None:
    directory = keys_dir(tmp_path)
    directory.mkdir(parents=True)
    (directory / KEY_FILE).write_bytes(content)
    with pytest.raises(DeviceKeyError, match=message):
        ensure_device_key(tmp_path)
    assert (directory / KEY_FILE).read_bytes() == content


def test_unwritable_key_directory_is_a_device_key_error(tmp_path: Path) -> None:
    keys_dir(tmp_path).write_text("a file where the key directory should be")
    with pytest.raises(DeviceKeyError, match="cannot create the device key"):
        ensure_device_key(tmp_path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(DeviceKeyError, match="cannot read device key"):
        load_device_key(tmp_path / "absent.pem")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("zz", "not hex", id="not-hex"),
        pytest.param("00" * 31, "32 bytes, got 31", id="short"),
        pytest.param("00" * 33, "32 bytes, got 33", id="long"),
    ],
)
def test_bad_public_key_text(text: str, message: str) -> None:
    with pytest.raises(DeviceKeyError, match=message):
        DevicePublicKey.from_hex(text)

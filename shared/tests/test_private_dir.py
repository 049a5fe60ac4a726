"""vigil up's private directories in /tmp: made 0700, trusted only when they are."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vigil.embedded import StackError, private_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_made_private(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "rt", os.getuid(), os.getgid())
    assert mode(path) == 0o700


def test_podmans_runtime_dir_may_be_searchable(tmp_path: Path) -> None:
    # Podman makes its runtime dir 0711 itself (podman build, a container in a user
    # namespace of its own); vigil up must still start after it, and leave it so.
    path = tmp_path / "rt"
    path.mkdir(mode=0o700)
    path.chmod(0o711)
    assert private_dir(path, os.getuid(), os.getgid(), searchable=True) == path
    assert mode(path) == 0o711
    with pytest.raises(StackError, match="not a private directory"):
        private_dir(path, os.getuid(), os.getgid())  # any other private dir: refused


@pytest.mark.parametrize("bits", [0o755, 0o770, 0o707, 0o713])
def test_readable_or_writable_by_others_is_refused(tmp_path: Path, bits: int) -> None:
    path = tmp_path / "rt"
    path.mkdir()
    path.chmod(bits)
    with pytest.raises(StackError, match="not a private directory"):
        private_dir(path, os.getuid(), os.getgid(), searchable=True)
    assert mode(path) == bits  # left as it was


def test_a_symlink_or_someone_elses_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o711)
    link = tmp_path / "rt"
    link.symlink_to(target)
    with pytest.raises(StackError):
        private_dir(link, os.getuid(), os.getgid())
    assert mode(target) == 0o711
    with pytest.raises(StackError):
        private_dir(target, os.getuid() + 1, os.getgid())

"""Write files and directories so a crash never leaves a half-written result behind.

Each writer fills a temporary sibling, fsyncs it, renames it into place and fsyncs the parent
directory: a reader sees the old or the new version, never a mix, and a write that returned
survives a power cut. A killed writer leaves only its hidden ``.<name>.tmp-*`` sibling.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from utils.errors import UserError


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success rename it into place.

    An existing ``final`` is replaced only after the new one is complete (old moved aside,
    new renamed in, old deleted), so readers see either the old or the new directory.
    On an exception the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        fsync_tree(tmp)  # contents on disk before the rename makes them visible
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)  # the rename itself survives a power cut
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``final`` for code that writes by path
    (``np.save``, ``tokenizer.save``); rename it into place when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``final``; rename it into place when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def writable_dir(path: str | os.PathLike, key: str) -> Path:
    """Create directory ``path`` (with parents) and check a file can be written in it.

    ``key`` names the setting in the message (e.g. ``train.out_dir``); a path that is a file,
    lies under a file, or cannot be created or written is a UserError, before any work starts.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{key}={str(path)!r} is a file (or lies under one), not a directory; "
                        "point it at a directory.") from None
    except OSError as err:
        raise UserError(f"{key}={str(path)!r} cannot be written ({err.strerror}); choose a directory you can "
                        "write to.") from None
    return path


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (and ``path`` itself): data and names."""
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            _fsync_file(f)
        elif f.is_dir():
            fsync_dir(f)
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the entries created or renamed in it are on disk (POSIX needs this
    after a rename; without it a power cut can lose a save that was reported done)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_hash(path: str | os.PathLike) -> str:
    """Stable short hash (first 16 hex digits of SHA-256) of a file's bytes."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_json_object(file: Path, damaged: str = "") -> dict:
    """A JSON file that must hold one object (a config, a meta.json): its dict, or a UserError naming
    the file and what is wrong with it (``damaged``: what to add, e.g. "; the checkpoint is damaged")."""
    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}){damaged}.") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object{damaged}.")
    return data

"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a half-written file in place of a good one.

The data goes to a temporary file in the target's folder (same filesystem, so the final rename is atomic), is
flushed and fsync'ed, then renamed over the target with os.replace; the folder is fsync'ed so the rename itself
survives a power loss. On any error, KeyboardInterrupt included, the temporary file is removed and the old target is
left untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Context manager yielding a file object whose content replaces `path` only when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Not tempfile.mkstemp: it creates the file 0600, so every checkpoint would be unreadable to other users. Mode
    # 0666 lets the umask decide, as a plain open() would; a replaced file keeps its own mode.
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp_path, stat.S_IMODE(os.stat(path).st_mode))
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    _fsync_folder(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _fsync_folder(folder: str) -> None:
    # Not every platform/filesystem lets a directory be opened for fsync; the rename is still atomic there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Makes `dst` hold `src`'s content, atomically: a hard link renamed over dst (or an atomic copy where the
    filesystem has no hard links). Used to point latest/best at a checkpoint without writing it twice."""
    src, dst = os.fspath(src), os.fspath(dst)
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f".{os.path.basename(dst)}.{secrets.token_hex(8)}.tmp")
    try:
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links: copy instead
        with open(src, "rb") as fh:
            atomic_write_bytes(dst, fh.read())
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)

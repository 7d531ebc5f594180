"""Writing files and folders so that a crash never leaves one that looks complete.

Every writer in the project goes through these two context managers: the content is written under a
temporary name beside the target, flushed to disk (fsync of the file, then of the folder holding it),
and only then renamed over the target, one `os.replace` on one filesystem. A reader sees the old
version or the new one, never half of one; an interrupted write leaves a dot-named temp that nothing
reads and that the next write of the same target does not trip over.

    with atomic_file(run_dir / "eval.json") as tmp:      # tmp: a Path to write
        tmp.write_text(...)
    with atomic_folder(run_dir / "model") as tmp:        # tmp: an empty folder to fill
        backbone.save_pretrained(tmp)
    write_json(path, obj)                                # the common case of the first
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk (folders: so that a rename inside them survives a crash)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open folders; the data itself was synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fsync_path(p)
    for p in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        fsync_path(p)
    fsync_path(folder)


def _readable(path: Path) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; the result should follow the umask as a plain
    open() or mkdir() would, so that a shared cache or a model folder stays readable by the group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _readable(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(out: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success its files are fsynced and it replaces
    `out` (an older `out` is moved aside first and deleted only once the new one is in place).
    keep_existing: an `out` that appeared meanwhile (another process made the same folder) is kept
    and the new one dropped."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _readable(tmp)
        fsync_tree(tmp)
        if keep_existing and out.exists():
            return
        try:
            replace_folder(tmp, out)
        except OSError:
            if not (keep_existing and out.is_dir()):  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished folder to `out`; an older `out` is replaced only once the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")

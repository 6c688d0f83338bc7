"""Atomic writes: a file or directory appears whole under its final name, or not at all.

Staging names carry the writer's host and pid (``.NAME.tmp-HOST-PID-RANDOM``, ``.NAME.old-HOST-PID``), so the
next write of ``NAME`` removes what a killed writer on this host left behind. Outputs get the permissions of
the process's umask, like any file the user creates (:func:`apply_umask`; libraries such as safetensors create
``0600`` files, which a staged directory is normalised from). :func:`check_output` is the output rule every
command applies to its outputs before any work (``docs/guarantees.md``).
"""

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"


def _staging_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one owned by another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(path: PathLike) -> None:
    """Remove the staging leftovers of ``path`` whose writer (a process on this host) no longer runs."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(
        rf"^\.{re.escape(path.name)}\.(?:tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}|old-(?:(?P<old_host>.+)-)?(?P<old_pid>\d+))$"
    )
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if not match:
            continue
        host = match["host"] if match["pid"] else match["old_host"]
        pid = int(match["pid"] or match["old_pid"])
        if (host is not None and host != _host()) or pid == os.getpid() or pid_alive(pid):
            continue
        logger.info("removing %s, left by a writer (pid %d) that no longer runs", entry, pid)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_replaceable(path: PathLike, overwrite: bool) -> None:
    """Raise ``ValueError`` unless a directory may be written at ``path``.

    Allowed: nothing there, an empty directory, or (with ``overwrite``) a non-empty directory. A file or a
    symbolic link at ``path`` is never replaced by a directory.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path}: is a symbolic link; refusing to replace it (give the directory it points to)")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory; refusing to replace it (choose another output)")
    if path.exists() and not overwrite and not _is_empty_directory(path):
        raise ValueError(f"{path}: already exists and is not empty; refusing to replace it")


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output(
    path: Optional[PathLike],
    inputs: Iterable[Optional[PathLike]] = (),
    overwrite: bool = False,
    ours: Optional[Callable[[Path], bool]] = None,
    directory: bool = False,
    what: str = "an output of this command",
    foreign_replaceable: bool = True,
) -> bool:
    """The output rule, checked before any work; returns whether ``path`` holds an output the project wrote.

    Refused whatever ``overwrite`` says: an output that is one of ``inputs`` (``None`` entries are ignored) or a
    directory holding one; a symbolic link where a directory is written; a directory where a file is written
    and a file where a directory is. Refused unless ``overwrite`` (and ``foreign_replaceable``): an existing file
    or non-empty directory that ``ours`` does not recognise (``what`` names what it would be). A file carries
    no mark of its writer, so without ``ours`` every existing file is foreign. Absent paths and empty directories
    are fine, and so is no output (``path`` None). A ``True`` result (recognised as ours) is for the caller to
    resume or replace.
    """
    if path is None:
        return False
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        if source is not None and _inside(Path(source).resolve(), resolved):
            raise ValueError(f"{path}: the output is the input {source} (or holds it); choose another output")
    if directory:
        if path.is_symlink():
            raise ValueError(f"{path}: is a symbolic link; refusing to replace it (give the directory it points to)")
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path}: exists and is not a directory; refusing to replace it (choose another output)")
        if not path.exists() or _is_empty_directory(path):
            return False
    else:
        if path.is_dir():
            raise ValueError(f"{path}: is a directory; give a file name for this output")
        if not path.exists() and not path.is_symlink():
            return False
    if ours is not None and ours(path):
        return True
    if overwrite and foreign_replaceable:
        return False
    fix = "choose another output or pass --overwrite" if foreign_replaceable else "choose a new or empty output"
    found = "exists" if ours is None else f"exists and is not {what}"
    raise ValueError(f"{path}: {found}; refusing to replace it ({fix})")


def current_umask() -> int:
    """The process's umask (read without changing it where Linux reports it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: PathLike) -> None:
    """Give ``root`` and everything under it the permissions of a new file or directory under the umask
    (``0666 & ~umask`` for files, ``0777 & ~umask`` for directories; executables keep their x bits)."""
    mask = current_umask()
    root = Path(root)
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` when the block succeeds.

    ``path`` may be absent or an empty directory; a non-empty directory is replaced only with ``overwrite``
    (see :func:`check_replaceable`, checked before and after the block). An existing ``path`` is moved
    aside first and removed only once the new one is in place, so a crash at any moment leaves either the
    old or the new directory under a recognisable name.
    """
    path = Path(path)
    check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = _staging_name(path)
    staging.mkdir()
    try:
        yield staging
        check_replaceable(path, overwrite)
        apply_umask(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = path.with_name(f".{path.name}.old-{_host()}-{os.getpid()}")
    for _ in range(100):  # another writer of ``path`` may swap its directory in between: move that aside too
        shutil.rmtree(previous, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, previous)
        try:
            os.replace(staging, path)
            break
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    else:
        raise RuntimeError(f"{path}: could not move the new directory into place")
    shutil.rmtree(previous, ignore_errors=True)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = _staging_name(path)
    handle = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def atomic_write_json(path: PathLike, payload: Any, indent: int = 2) -> None:
    """Write ``payload`` as an indented JSON document to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")

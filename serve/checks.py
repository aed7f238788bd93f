"""What a command checks before it does any work: the paths and options a person gives.

Every check raises :class:`UsageError` (a ValueError) with one line that names the option and the
path, what was expected and what was found, before a row is read or a byte is written. The
offline commands use them, and the service's file options (profile directories, TLS files) can.

Outputs are written beside their final name and renamed into place whole (:class:`PartialFile`),
so a failed, stopped or killed command never leaves a file that looks finished.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: outputs are still renamed whole, just not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A path or option given to a command is not what it must be: missing, of the wrong kind,
    unreadable, not writable, out of range, or about to overwrite something it must not."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (pyarrow's messages can hold newlines)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _stat(path: Path, option: str, expected: str) -> os.stat_result | None:
    """``path``'s status (links followed), None when nothing is there; a dangling link, a link loop
    or a path through a file is a UsageError."""
    try:
        return path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise UsageError(f"{option} {path}: expected {expected}, found a symbolic link to nothing "
                            f"({os.readlink(path)})") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{option} {path}: expected {expected}, found a loop of symbolic links") from None
        if exc.errno == errno.ENOTDIR:
            raise UsageError(f"{option} {path}: expected {expected}, found a path that goes through a file "
                            "as if it were a directory") from None
        raise UsageError(f"{option} {path}: expected {expected}, found a path that cannot be looked up "
                        f"({exc.strerror})") from None


def input_file(path: str | Path, option: str, what: str = "a Parquet file") -> Path:
    """``path`` as an existing, non-empty regular file that this process can read."""
    path = Path(path)
    st = _stat(path, option, what)
    if st is None:
        raise UsageError(f"{option} {path}: expected {what}, found no such file")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option} {path}: expected {what}, found {_kind(st.st_mode)}")
    if st.st_size == 0:
        raise UsageError(f"{option} {path}: expected {what}, found an empty file (0 bytes)")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise UsageError(f"{option} {path}: expected {what} this user can read, found {exc.strerror}") from None
    return path


def native_file(path: str | Path, mode: str = "rb") -> pa.NativeFile:
    """An Arrow file on ``path``, opened by its bytes: Arrow takes a str path as UTF-8, so a name
    that is not (a Linux file name can hold any byte) fails there and works here."""
    return pa.OSFile(os.fsencode(path), mode)


def parquet_schema(path: str | Path, option: str) -> tuple[pa.Schema, int]:
    """The Arrow schema and row count of a Parquet file, read from its footer (no rows read)."""
    path = input_file(path, option)
    try:
        with native_file(path) as handle, pq.ParquetFile(handle) as parquet:
            return parquet.schema_arrow, parquet.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{option} {path}: expected a Parquet file, found a file pyarrow cannot read as "
                        f"Parquet ({one_line(exc)})") from None


def read_error(path: Path, exc: BaseException) -> UsageError:
    """The error for a Parquet file whose data pages cannot be read (corrupt, truncated)."""
    return UsageError(f"{path}: expected Parquet data that can be read, found a damaged file ({one_line(exc)})")


def read_table(path: str | Path, option: str, columns: list[str] | None = None) -> pa.Table:
    """``pq.read_table`` of a checked input, its read errors named after the file."""
    path = Path(path)
    parquet_schema(path, option)
    try:
        with native_file(path) as handle:
            return pq.read_table(handle, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise read_error(path, exc) from None


def same_file(a: Path, b: Path) -> bool:
    """Do ``a`` and ``b`` name one file (links, ``..`` and hard links resolved)?"""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, directory: Path) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _check_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory (missing ones are created)."""
    for ancestor in path.absolute().parents:
        st = _stat(ancestor, option, "a directory")
        if st is None:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{option} {path}: expected {ancestor} to be a directory, found {_kind(st.st_mode)}")
        return


def output_file(path: str | Path, option: str, *, inputs: Iterable[Path | tuple[str, Path]] = (),
                outside: Iterable[Path] = (), partial: bool = True) -> Path:
    """``path`` as a file a command may write: absent or a regular file (never a directory or a
    device: renaming over ``/dev/null`` would replace it), under directories (or where they can be
    created), neither it nor its ``.partial`` file being any of ``inputs`` (paths, or (role, path)
    pairs such as ("--out", decisions) for other files the command uses), and outside each of the
    ``outside`` directories (a profile)."""
    path = Path(path)
    _check_parent(path, option)
    st = _stat(path, option, "a file to write")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option} {path}: expected a file to write (absent or a regular file), found {_kind(st.st_mode)}")
    targets = [(path, "it")] + ([(partial_path(path), f"its partial file {partial_path(path).name}")] if partial else [])
    for used in inputs:
        role, source = used if isinstance(used, tuple) else ("the input", used)
        for target, name in targets:
            if same_file(target, Path(source)):
                raise UsageError(f"{option} {path}: expected a path of its own, found {name} is {role} {source} "
                                 "(writing there would destroy it)")
    for directory in outside:
        if _inside(path, Path(directory)):
            raise UsageError(f"{option} {path}: expected a path outside {directory}, found it inside")
    return path


def output_dir(path: str | Path, option: str) -> Path:
    """``path`` as a directory a command may write into: absent or a directory, under directories."""
    path = Path(path)
    _check_parent(path, option)
    st = _stat(path, option, "a directory")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option} {path}: expected a directory (absent or existing), found {_kind(st.st_mode)}")
    return path


def make_dirs(directory: Path, option: str) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those created (deepest last)."""
    missing = [d for d in [directory, *directory.parents] if not os.path.lexists(d)][::-1]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {directory}: expected a directory this user can create, found "
                        f"{exc.strerror or exc}") from None
    return missing


def remove_dirs(created: list[Path]) -> None:
    """Remove the directories :func:`make_dirs` created, when still empty (deepest first)."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            return


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class PartialFile:
    """``PATH.partial``: where an output is written before it is renamed onto ``PATH`` whole.

    :meth:`claim` creates it (and missing parent directories) and takes an exclusive ``flock`` on
    it: a second process writing the same output is refused while the first holds it, and a
    partial file left by a killed process (whose lock died with it) is taken over and emptied.
    :meth:`commit` renames it into place; :meth:`discard` removes it and the directories
    :meth:`claim` created. Either releases the lock.
    """

    def __init__(self, target: str | Path, option: str):
        self.target = Path(target)
        self.path = partial_path(self.target)
        self.option = option
        self._fd: int | None = None
        self._created: list[Path] = []

    def claim(self) -> Path:
        self._created = make_dirs(self.target.parent, self.option)
        try:
            self._fd = self._lock()
        except BaseException:
            remove_dirs(self._created)
            raise
        return self.path

    def _lock(self) -> int:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise UsageError(f"{self.option} {self.target}: expected a directory this user can write "
                                f"{self.path.name} into, found {exc.strerror or exc}") from None
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UsageError(f"{self.option} {self.target}: expected no other process writing it, found "
                                f"{self.path} locked by one that is running") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                if os.fstat(fd).st_size:
                    logger.info("%s: taking over the partial file an earlier, stopped run left", self.path)
                os.ftruncate(fd, 0)
                return fd
            os.close(fd)  # the file was renamed or removed between open and lock: try again
        raise UsageError(f"{self.option} {self.target}: expected to lock {self.path}, found it replaced again and again")

    def commit(self) -> Path:
        """Rename the finished partial file onto the target (one atomic step)."""
        os.replace(self.path, self.target)
        self._release()
        return self.target

    def discard(self) -> None:
        """Remove the partial file (if this process holds it) and the directories claim made."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self._release()
            remove_dirs(self._created)

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a device this machine cannot run on (``cuda`` on a CPU build of torch, an index
    beyond the GPUs present) before any work; None (the default: CUDA when present) passes."""
    if device is None:
        return
    from hitl_triage.engine.device import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise UsageError(f"{option}: {str(exc).removeprefix('device: ')}") from None


def positive_int(value, option: str) -> int:
    """``value`` as an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{option}: expected a positive integer, found {value!r}")
    return value

"""Atomic writes: a killed process leaves the old file or the new one, never half of one.

Files and folders are created with the user's umask (a colleague on the same server can
read a model), and never in a folder that does not exist: a missing output folder is an
error naming it, not a silent `mkdir -p`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tlearn.core.errors import ArtifactError, OutputError


def current_umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What open() would give a new file: 0o666 minus the umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """What mkdir() would give a new folder: 0o777 minus the umask (0o755 under 022)."""
    return 0o777 & ~current_umask()


def check_output_parent(path: str | Path, option: str = "-o") -> Path:
    """`path` is where an output goes: its folder must exist (no silent mkdir -p)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputError(
            f"{option} {path}: the folder {parent} {what}; create it first "
            f"(mkdir -p {parent}) or choose another {option}"
        )
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **kwargs) -> Iterator:
    """Write to a temporary file beside `path`, fsync, then rename over `path`. The
    folder must exist; the file gets the umask's permissions, like any new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, file_mode())  # mkstemp makes 0600: a model must be readable as usual
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | Path, error: type[Exception], hint: str = ""):
    """A JSON document tlearn wrote, or `error` naming the file ("not valid JSON")."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path}: not valid JSON ({e}){hint}") from None
    except RecursionError:  # json nests by recursion: a hostile file can nest deeper
        raise error(f"{path}: JSON nested too deeply to be a file tlearn wrote{hint}") from None


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the OS or the file system cannot, and the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_copies(path: Path) -> list[Path]:
    """The hidden copies of `path` a replacement moves aside (`.NAME.*.old/d`), newest first."""
    found = [p / "d" for p in path.parent.glob(f".{glob.escape(path.name)}.*.old")]
    found = [p for p in found if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def recover_dir(path: str | Path) -> bool:
    """Put back a directory that a replacement killed between its two renames left hidden
    (`.NAME.*.old/d`, the complete old copy); True when it did. A directory that is there
    is left alone, and so are leftovers beside it (another run may still be writing)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return False
    for old in _old_copies(path):
        with contextlib.suppress(OSError):
            os.replace(old, path)
            shutil.rmtree(old.parent, ignore_errors=True)
            return True
    return False


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name, then move it into place. With `force`
    an existing directory is replaced only once the new one is complete: in one atomic
    exchange where the OS allows (Linux), else in two renames whose interruption
    recover_dir undoes (the old copy comes back), so there is always a complete one."""
    path = Path(path)
    recover_dir(path)
    if path.exists() and not force:
        raise ArtifactError(f"{path} already exists; choose another -o or pass --force")
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory")
    check_output_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists() and exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # the old copy, now under tmp's name
        elif path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            try:
                os.replace(path, old / "d")
                os.replace(tmp, path)
            except BaseException:
                recover_dir(path)  # the old copy back, if it was moved aside
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an advisory lock (flock) on the file `path` for the block, or raise OutputError
    at once when another process holds it: two runs writing the same output (`what`) never
    mix their rows. The lock file is removed afterwards; where the OS has no flock the
    block runs unlocked."""
    try:
        import fcntl  # POSIX only
    except ImportError:
        yield
        return
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"another tlearn run is writing {what} (it holds {path}); wait for it to "
                "finish, or choose another -o"
            ) from None
        try:  # the holder before us may have removed the file: lock the one now there
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)

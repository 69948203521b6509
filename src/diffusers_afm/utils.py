"""Small helpers shared by the library and the example scripts: writing outputs atomically."""

import os
import shutil
import tempfile
from contextlib import contextmanager


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(path: str):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    A crash while writing leaves `path` as it was (the temporary folder is removed), so a reader
    never sees a half-written pipeline or checkpoint.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, path)


def replace_path(src: str, dst: str) -> None:
    """Move `src` (a file or folder) to `dst`, replacing whatever is there.

    An existing folder is first renamed aside and removed only once `src` is in place.
    """
    if os.path.isdir(dst) and not os.path.islink(dst):
        parent = os.path.dirname(os.path.abspath(dst))
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def atomic_save_pretrained(obj, path: str, **kwargs) -> None:
    """`obj.save_pretrained(path)` (safetensors), written to a temporary folder and renamed into place."""
    with atomic_directory(path) as tmp:
        obj.save_pretrained(tmp, safe_serialization=True, **kwargs)


@contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Open a temporary file beside `path`; it replaces `path` only when the block succeeds."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

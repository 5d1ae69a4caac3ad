"""Where the C++ kernels are built and loaded from, and who could have put a library there.

Loading a shared library runs its code, so a library is loaded only from places no other user
can write: the directory must be owned by the current user and not writable by group or
others, and so must every parent up to ``/`` (root may own a parent; a world-writable parent
such as ``/tmp`` needs the sticky bit, so that others cannot rename what is ours). Group write
is fine when the group is the user's own (user private groups, where the umask is 002 and
``~/.cache`` is often 0775). Missing directories are created with mode 0700. Anything else is refused with the reason, and
barkgpt then runs on the torch backend.

Where: ``$BARKGPT_CACHE_DIR/cpp``, else ``$XDG_CACHE_HOME/barkgpt/cpp`` (``~/.cache``), else,
when that cannot be created (read-only or missing home), ``<tempdir>/barkgpt-<uid>/cpp``: a
predictable name another user can create first, hence the checks.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from typing import Iterable, Optional


class UnsafeCacheDir(ImportError):
    """A build directory or library another user could have written; the message says why."""


def _checks_apply() -> bool:
    return hasattr(os, "geteuid") and os.name != "nt"  # Windows: ACLs, not modes; not checked


@functools.lru_cache(maxsize=16)
def _own_group(gid: int) -> bool:
    """gid is the current user's private group: named after the user, the user's primary group,
    no other members listed, so its write permission lets no one else in."""
    try:
        import grp
        import pwd
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError, OSError):
        return False
    return gid == os.getegid() and group.gr_name == user and all(m == user for m in group.gr_mem)


def _chain(path: str):
    """path, then each parent up to the root."""
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def unsafe_reason(path: str, owners: Iterable[int] = ()) -> Optional[str]:
    """Why another user could change what is in the directory (or file) ``path``, or None.

    ``path`` must belong to the current user (or to one of ``owners``) and not be writable by
    group or others; its parents must belong to those users or root, and be writable by no one
    else unless sticky. Checked along the path as given and as resolved (symlinks)."""
    if not _checks_apply():
        return None
    me = os.geteuid()
    trusted = {me, *owners}
    seen = set()
    for start in (os.path.abspath(path), os.path.realpath(path)):
        for i, p in enumerate(_chain(start)):
            if p in seen:
                continue
            seen.add(p)
            try:
                st = os.lstat(p)
            except OSError as e:
                return f"{p} cannot be examined ({e.strerror or e})"
            what = p if i == 0 else f"its parent {p}"
            if st.st_uid not in trusted and not (i > 0 and st.st_uid == 0):
                return f"{what} is owned by uid {st.st_uid}, not by you (uid {me})"
            if stat.S_ISLNK(st.st_mode):
                continue  # a link's own mode means nothing; its target is on the resolved chain
            others_write = st.st_mode & 0o002 or (st.st_mode & 0o020 and not _own_group(st.st_gid))
            if others_write and not (i > 0 and st.st_mode & stat.S_ISVTX):
                return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _refusal(path: str, reason: str) -> UnsafeCacheDir:
    return UnsafeCacheDir(
        f"refusing to build or load the C++ kernels in {path}: {reason}, so another user could "
        f"make barkgpt run their code. Make it private (it and its parents yours, chmod go-w), or "
        f"set BARKGPT_CACHE_DIR to a directory only you can write")


def private_dir(path: str) -> str:
    """Create ``path`` (each missing directory with mode 0700) and check that it is private;
    raises UnsafeCacheDir if it is not, OSError if it cannot be created."""
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # another process made it meanwhile: checked below like any other
            pass
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a directory")
    reason = unsafe_reason(path)
    if reason is not None:
        raise _refusal(path, reason)
    return path


def cache_root() -> str:
    """The private directory the C++ kernels are built in (created if needed)."""
    configured = os.environ.get("BARKGPT_CACHE_DIR")
    if configured:
        return private_dir(os.path.join(configured, "cpp"))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    try:
        return private_dir(os.path.join(xdg, "barkgpt", "cpp"))
    except UnsafeCacheDir:
        raise
    except OSError:  # no writable home (service accounts, HOME=/nonexistent): the temp dir
        pass
    uid = os.geteuid() if hasattr(os, "geteuid") else 0
    return private_dir(os.path.join(tempfile.gettempdir(), f"barkgpt-{uid}", "cpp"))


def check_library(path: str, owners: Iterable[int] = ()) -> str:
    """``path`` if it is a regular file that only the current user (or ``owners``) could have
    written, in a directory likewise; raises UnsafeCacheDir otherwise."""
    if not _checks_apply():
        return path
    try:
        st = os.stat(path)
    except OSError as e:
        raise UnsafeCacheDir(f"cannot examine {path} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refusal(path, f"{path} is not a regular file")
    reason = unsafe_reason(path, owners) or unsafe_reason(os.path.dirname(os.path.abspath(path)), owners)
    if reason is not None:
        raise _refusal(path, reason)
    return path

"""Whether a path lives on a network file system, where SQLite must not keep the event log.

SQLite's locking (and WAL's shared memory) relies on POSIX locks and mmap that NFS, SMB, sshfs and
the like do not provide faithfully: two hosts writing one database file over such a mount corrupt
it, silently. Several hosts share the event log through PostgreSQL instead (JETBOX_DATABASE_URL).

Stdlib only; reads the mount table (`MOUNTS`, /proc/mounts), which a test may point elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MOUNTS = Path("/proc/mounts")
# File system types whose locking SQLite cannot trust (the kernel's names, as /proc/mounts shows them).
NETWORK_TYPES = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs", "ocfs2",
        "gfs2", "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs",
        "fuse.cephfs", "fuse.juicefs", "fuse.goofys", "davfs", "fuse.davfs2", "virtiofs",
    }
)  # fmt: skip


class NetworkFilesystemError(Exception):
    """The SQLite event log was asked to live on a network file system."""


def _unescape(field: str) -> str:
    """/proc/mounts writes a space as \\040, a tab as \\011, a backslash as \\134."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: Path, mounts: Path | None = None) -> tuple[str, str] | None:
    """The mount point and file system type holding `path` (which need not exist yet: its nearest
    existing parent is looked up), or None when the mount table cannot be read."""
    try:
        lines = (mounts or MOUNTS).read_text().splitlines()
    except OSError:
        return None
    target = Path(os.path.realpath(path))
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        holds = target == Path(point) or Path(point) in target.parents
        # The deepest mount holding it wins; of equal ones, the last (a later mount hides an earlier one).
        if holds and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def network_filesystem(path: Path, mounts: Path | None = None) -> str | None:
    """A description of the network mount holding `path` (`nfs4 at /mnt/lab`), or None when local."""
    found = mount_of(path, mounts)
    if found is None:
        return None
    point, fstype = found
    return f"{fstype} at {point}" if fstype in NETWORK_TYPES else None


def refuse_network_sqlite(db_path: Path, mounts: Path | None = None) -> None:
    """Raise NetworkFilesystemError, with the way out, when the SQLite file would be on a network mount."""
    where = network_filesystem(db_path, mounts)
    if where is not None:
        raise NetworkFilesystemError(
            f"the SQLite event log {db_path} is on a network file system ({where}): SQLite's locks do not hold "
            "there and several hosts writing it would corrupt it. Put JETBOX_HOME on a local disk, or share "
            "the event log through PostgreSQL: JETBOX_DATABASE_URL=postgresql://user:password@host/jetbox "
            '(docs/OPERATIONS.md, "Adding a host")'
        )

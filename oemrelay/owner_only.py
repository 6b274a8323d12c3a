"""
Files the relay writes are readable by their owner only.

SQLite creates a database's ``-wal`` and ``-shm`` files with the database
file's own permissions, so creating the database file 0600 before SQLite
opens it covers all three.
"""

from __future__ import annotations

import os

#: Read and write for the owner, nothing for group and others.
OWNER_ONLY = 0o600


def create_owner_only(path: str) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist; an existing file is left as it is."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, OWNER_ONLY)
    except FileExistsError:
        return
    # os.open's mode is filtered by the umask, which can only remove bits.
    os.close(descriptor)

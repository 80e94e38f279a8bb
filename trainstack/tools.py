"""The node-side programs `invoke train` installs into <remote_root>/bin before a run.

First boot installs only what the machine needs before any run (the job runner, the watchdog):
EC2 caps user-data at 16 KiB. The rest, `bootstrap/tools/` (rank 0's coordinator of multi-node
runs, the torchrun wrapper, the lister of the image's packages, the builder of a plain image's
base with the common ML libraries), is compared by content hash and copied when missing or
different — so a machine also gets newer versions of them.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import time
from typing import TYPE_CHECKING

from trainstack import bundled, contract
from trainstack.errors import RemoteCommandFailed

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection

TOOLS_DIR = bundled.tools_dir()


def local_tools() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(TOOLS_DIR.iterdir()) if path.is_file()}


def stale(listing: str) -> list[str]:
    """The tools whose node copy (as `sha256sum` printed their digests) is missing or different."""
    present = {}
    for line in listing.splitlines():
        digest, _, name = line.strip().partition("  ")
        present[posixpath.basename(name)] = digest
    return [name for name, content in local_tools().items() if present.get(name) != hashlib.sha256(content).hexdigest()]


def install(conn: "Connection", names: list[str]) -> None:
    """Copy these tools into the node's bin/ in one round trip (a tar on stdin)."""
    if not names:
        return
    tools = local_tools()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(tools[name]), 0o755, int(time.time())
            archive.addfile(info, io.BytesIO(tools[name]))
    from trainstack.remote import scripts

    bin_dir = conn.target.remote_path(contract.Remote.BIN)
    result = conn.run(scripts.command("tools-install.sh", [bin_dir]), stdin=buffer.getvalue(), check=False)
    if not result.ok:
        raise RemoteCommandFailed(
            f"installing {', '.join(names)} into {conn.target.remote_path(contract.Remote.BIN)} on "
            f"{conn.describe()} failed: {result.stderr.strip() or f'exit code {result.exit_code}'} "
            "(is the machine set up? `invoke wait`)",
            result,
        )

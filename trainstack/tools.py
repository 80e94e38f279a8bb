"""The node-side programs `invoke train` installs into <remote_root>/bin before a run.

First boot installs only what the machine needs before any run (the job runner, the watchdog):
EC2 caps user-data at 16 KiB. The rest, `bootstrap/tools/` (rank 0's coordinator of multi-node
runs, the torchrun wrapper, the lister of the image's packages), is compared by content hash
and copied when missing or different — so a machine also gets newer versions of them.
"""

from __future__ import annotations

import hashlib
import posixpath
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from trainstack import contract
from trainstack.errors import RemoteCommandFailed

if TYPE_CHECKING:
    from trainstack.connection import Connection

TOOLS_DIR = Path(__file__).resolve().parent.parent / "bootstrap" / "tools"


def local_tools() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(TOOLS_DIR.iterdir()) if path.is_file()}


def ensure_tools(conn: "Connection") -> list[str]:
    """Copy the tools the node lacks (or holds in another version); returns their names."""
    tools = local_tools()
    bin_dir = conn.target.remote_path(contract.Remote.BIN)
    paths = [posixpath.join(bin_dir, name) for name in tools]
    listing = conn.run(["sha256sum", *paths], check=False).stdout
    present = {}
    for line in listing.splitlines():
        digest, _, path = line.partition("  ")
        present[posixpath.basename(path)] = digest
    stale = [name for name, content in tools.items() if present.get(name) != hashlib.sha256(content).hexdigest()]
    for name in stale:
        path = posixpath.join(bin_dir, name)
        # Written aside and renamed: a runner starting meanwhile never sees half a file.
        script = f"umask 022 && mkdir -p {shlex.quote(bin_dir)} && cat >{shlex.quote(path)}.new && " \
                 f"chmod 0755 {shlex.quote(path)}.new && mv -f {shlex.quote(path)}.new {shlex.quote(path)}"
        result = conn.run(["sh", "-c", script], stdin=tools[name], check=False)
        if not result.ok:
            raise RemoteCommandFailed(
                f"installing {name} into {bin_dir} on {conn.describe()} failed: "
                f"{result.stderr.strip() or f'exit code {result.exit_code}'} (is the machine set up? `invoke wait`)",
                result,
            )
    return stale

"""What one sync did (or, as a dry run, would do)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainstack.transfer import human

TRANSPORT_RSYNC = "rsync"
TRANSPORT_TAR = "tar"
TRANSPORT_STREAM = "tar-stream"  # a small change set, applied by one remote shell
TRANSPORT_NONE = "none"


@dataclass
class SyncResult:
    """What one sync did (or, with `dry_run`, would do)."""

    files: int = 0  # files in the shipped set
    bytes_total: int = 0  # their total size
    transferred: int = 0  # files created or updated on the node
    deleted: int = 0  # files deleted on the node
    bytes_sent: int = 0  # bytes that went over the wire
    seconds: float = 0.0
    noop: bool = False  # nothing changed; nothing was transferred
    transport: str = TRANSPORT_NONE
    dry_run: bool = False
    #: The itemized changes ("+ path" new, "~ path" updated, "- path" deleted).
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Machine-made files moved out of the way to kept/, and files a deletion left in place.
    kept: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def summary(self) -> str:
        tree = f"{self.files:,} files ({human(self.bytes_total)}) in the tree"
        if self.noop:
            return f"already in sync: {tree}, nothing sent ({self.seconds:.2f} s)"
        new = sum(1 for line in self.changes if line.startswith("+"))
        updated = sum(1 for line in self.changes if line.startswith("~"))
        if not self.changes:  # counted without a listing
            new, updated = 0, self.transferred
        parts = [f"{new:,} new", f"{updated:,} updated", f"{self.deleted:,} deleted"]
        if self.dry_run:
            return f"would sync {', '.join(parts)} via {self.transport}: {tree}"
        return (
            f"synced {', '.join(parts)} ({human(self.bytes_sent)} sent) via {self.transport} "
            f"in {self.seconds:.2f} s: {tree}"
        )

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
        if self.noop:
            return (
                f"already in sync: {self.files:,} files ({human(self.bytes_total)}), nothing sent "
                f"({self.seconds:.2f} s)"
            )
        verb = "would sync" if self.dry_run else "synced"
        parts = [f"{self.transferred:,} updated", f"{self.deleted:,} deleted"]
        sent = "" if self.dry_run else f", {human(self.bytes_sent)} sent"
        return (
            f"{verb} {self.files:,} files ({human(self.bytes_total)}): {', '.join(parts)}{sent} "
            f"via {self.transport} in {self.seconds:.2f} s"
        )

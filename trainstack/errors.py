"""The exceptions trainstack raises on purpose.

Every error a user can cause or fix is a `TrainstackError`: the tasks print its
message as one line and exit non-zero, without a traceback. Messages say what
went wrong and what to do next. Anything else escaping is a bug and keeps its
traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainstack.remote.connection import CommandResult


class TrainstackError(Exception):
    """Base of every expected failure; `exit_code` is the process exit status."""

    exit_code: int = 1


class UsageError(TrainstackError):
    """Bad arguments or configuration given by the user."""

    exit_code = 2


class StackNotFound(TrainstackError):
    """The named stack does not exist or none is selected."""


class OutputsMissing(TrainstackError):
    """The stack exists but has no (complete) outputs: `pulumi up` has not run yet."""


class PulumiCliError(TrainstackError):
    """The pulumi CLI failed or is not installed."""


class LocalTargetError(TrainstackError):
    """The local target (a private sshd on 127.0.0.1) could not be started or stopped."""


class TargetUnreachable(TrainstackError):
    """SSH to a node failed after all retries."""


class EndpointLookupFailed(TargetUnreachable):
    """A node's SSH address, kept by its cloud's API rather than the stack outputs (a RunPod
    pod's), could not be looked up: no API key, a refused one, no answer, no such pod."""


class PodStarting(EndpointLookupFailed):
    """The pod exists but has no public SSH port yet: `invoke wait` waits for it."""


class PodGone(EndpointLookupFailed):
    """RunPod no longer knows the stack's pod."""


class HostKeyMismatch(TrainstackError):
    """The node presented a host key other than the one pinned in the stack outputs."""


class AuthenticationFailed(TrainstackError):
    """The node refused the stack's SSH key."""


class BootstrapFailed(TrainstackError):
    """The machine's first-boot setup reported failure (ready.json status failed)."""


class WaitTimeout(TrainstackError):
    """The machine did not become ready in time."""


class RemoteCommandFailed(TrainstackError):
    """A command we ran on a node exited non-zero."""

    def __init__(self, message: str, result: "CommandResult | None" = None) -> None:
        super().__init__(message)
        self.result = result


class DependencyInstallFailed(RemoteCommandFailed):
    """Installing the project's dependencies into the remote venv failed."""


class RunActive(TrainstackError):
    """A training run is already active on the node."""


class NoSuchRun(TrainstackError):
    """The requested run id does not exist on the node (or there are no runs yet)."""


class SyncError(TrainstackError):
    """Shipping the project to the node failed."""


class FetchError(TrainstackError):
    """Bringing results back from the node failed or would overwrite local files."""

"""Where trainstack keeps its files in the user's project: the one home of that layout.

    <project>/
      .trainstack/              private state (keys): never shipped, never a workdir
        stacks/<stack>/         one stack's state (`stack_state_dir`, a Target's `state_dir`):
          outputs.json          the cached stack outputs
          endpoints.json        nodes' SSH addresses looked up in their cloud's API (RunPod)
          known_hosts, id_key   the pinned host key and the stack's private key (0600)
          sync/ fetch.json cm/  what sync, fetch and the SSH ControlMaster keep per stack
        local/                  the local target: sshd configs and keys, outputs.json, and a
                                remote root per node (remote/, remote-1/, ...)
      runs/<stack>/             fetched results, one directory per run

A stack qualified as org/project/stack is one directory, its `/` written `__`. Standard
library only: every laptop-side module may import it, and it imports none of them.
"""

from __future__ import annotations

from pathlib import Path

STATE_DIRNAME = ".trainstack"
STACKS_DIRNAME = "stacks"
#: Under `.trainstack/`: the local target's own directory.
LOCAL_DIRNAME = "local"
#: Under the project: fetched runs, <project>/runs/<stack>/<run-id>/.
RUNS_DIRNAME = "runs"

# Inside one stack's state dir.
OUTPUTS_CACHE = "outputs.json"
ENDPOINTS_CACHE = "endpoints.json"
KNOWN_HOSTS = "known_hosts"
PRIVATE_KEY = "id_key"
SYNC_STATE = "sync"
FETCH_RECORD = "fetch.json"
CONTROL_DIR = "cm"

#: Inside the local target's dir: its outputs, in the shape of a Pulumi stack's.
LOCAL_OUTPUTS = "outputs.json"


def state_root(project_dir: Path) -> Path:
    """`<project>/.trainstack`: everything under it is private."""
    return Path(project_dir) / STATE_DIRNAME


def stack_dirname(stack: str) -> str:
    """One directory name per stack, also for a qualified org/project/stack."""
    return stack.replace("/", "__")


def stack_state_dir(project_dir: Path, stack: str) -> Path:
    return state_root(project_dir) / STACKS_DIRNAME / stack_dirname(stack)


def local_dir(project_dir: Path) -> Path:
    return state_root(project_dir) / LOCAL_DIRNAME


def local_outputs_path(project_dir: Path) -> Path:
    return local_dir(project_dir) / LOCAL_OUTPUTS


def runs_root(project_dir: Path) -> Path:
    """`<project>/runs`: fetched runs of every stack (never shipped by sync)."""
    return Path(project_dir) / RUNS_DIRNAME


def fetched_runs_dir(project_dir: Path, stack: str) -> Path:
    """Where fetched runs of one stack land: `<project>/runs/<stack>/`."""
    return runs_root(project_dir) / stack_dirname(stack)


def is_private(path: Path, project_dir: Path) -> bool:
    """Whether `path` (resolved) is `.trainstack/` of the project or inside it."""
    private = state_root(Path(project_dir).resolve())
    resolved = Path(path).resolve()
    return resolved == private or private in resolved.parents

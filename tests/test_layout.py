"""The project's local files have one home, trainstack.layout: stack resolution, the local
target and fetch find them where it says."""

from __future__ import annotations

import json
from pathlib import Path

from trainstack import contract, layout, local, stack


def test_state_paths(tmp_path: Path) -> None:
    assert layout.state_root(tmp_path) == tmp_path / ".trainstack"
    assert layout.stack_state_dir(tmp_path, "exp1") == tmp_path / ".trainstack" / "stacks" / "exp1"
    # A qualified stack name is one directory.
    assert layout.stack_state_dir(tmp_path, "org/proj/exp1") == tmp_path / ".trainstack" / "stacks" / "org__proj__exp1"
    assert layout.local_outputs_path(tmp_path) == tmp_path / ".trainstack" / "local" / "outputs.json"
    assert layout.fetched_runs_dir(tmp_path, "org/exp1") == tmp_path / "runs" / "org__exp1"


def test_private_state_is_recognised_through_links(tmp_path: Path) -> None:
    (tmp_path / ".trainstack" / "stacks").mkdir(parents=True)
    (tmp_path / "code").mkdir()
    (tmp_path / "sneaky").symlink_to(tmp_path / ".trainstack" / "stacks")
    assert layout.is_private(tmp_path / ".trainstack", tmp_path)
    assert layout.is_private(tmp_path / ".trainstack" / "stacks", tmp_path)
    assert layout.is_private(tmp_path / "sneaky", tmp_path)
    assert not layout.is_private(tmp_path / "code", tmp_path)
    assert not layout.is_private(tmp_path, tmp_path)


def test_stack_and_local_target_use_the_layout(tmp_path: Path, monkeypatch) -> None:
    target = local.LocalTarget(tmp_path)
    assert target.root == layout.local_dir(tmp_path)
    assert target.outputs_file == layout.local_outputs_path(tmp_path) == local.outputs_path(tmp_path)
    # The names stack.py has always offered stay importable from there.
    assert stack.stack_state_dir is layout.stack_state_dir
    assert (stack.RUNS_DIRNAME, stack.STATE_DIRNAME, stack.OUTPUTS_CACHE) == (
        layout.RUNS_DIRNAME, layout.STATE_DIRNAME, layout.OUTPUTS_CACHE,
    )
    raw = {
        contract.Outputs.NODES: [{"host": "127.0.0.1", "port": 2222}],
        contract.Outputs.SSH_USER: "me",
        contract.Outputs.SSH_HOST_PUBLIC_KEY: "ssh-ed25519 AAAA",
        contract.Outputs.REMOTE_ROOT: "/r",
    }
    layout.local_outputs_path(tmp_path).parent.mkdir(parents=True)
    layout.local_outputs_path(tmp_path).write_text(json.dumps(raw))
    monkeypatch.delenv("TRAINSTACK_WORKDIR", raising=False)
    resolved = stack.resolve_target(contract.LOCAL_STACK, project_dir=tmp_path)
    assert resolved.state_dir == layout.stack_state_dir(tmp_path.resolve(), contract.LOCAL_STACK)
    assert resolved.outputs.nodes[0].port == 2222


def test_fetch_lands_where_the_layout_says(tmp_path: Path) -> None:
    from trainstack import fetch

    outputs = contract.StackOutputs.parse("org/exp1", {
        contract.Outputs.NODES: [{"host": "h"}],
        contract.Outputs.SSH_USER: "u",
        contract.Outputs.SSH_HOST_PUBLIC_KEY: "k",
        contract.Outputs.REMOTE_ROOT: "/r",
    })
    target = stack.Target("org/exp1", outputs, None, tmp_path / "s", (), None, project_dir=tmp_path)
    assert fetch.local_runs_root(target) == layout.fetched_runs_dir(tmp_path, "org/exp1")

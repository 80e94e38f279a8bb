"""Stack resolution: precedence of --stack/env/pulumi, workdir and config, outputs and their cache."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from trainstack import contract, local
from trainstack.remote.connection import Connection
from trainstack.errors import OutputsMissing, PulumiCliError, StackNotFound, UsageError
from trainstack.stack import resolve_stack_name, resolve_target, stack_state_dir

FAKE_PULUMI = """#!/bin/sh
# Answers like the pulumi CLI: the selected stack, and `stack output --json` from a file.
echo "$*" >> "$FAKE_PULUMI_CALLS"
case "$*" in
  "stack --show-name") echo "${FAKE_PULUMI_SELECTED:?}" ;;
  *"stack output --json --show-secrets --stack"*)
    [ -f "$FAKE_PULUMI_OUTPUTS" ] || { echo "error: no stack named 'x' found" >&2; exit 255; }
    cat "$FAKE_PULUMI_OUTPUTS" ;;
  *) exit 2 ;;
esac
"""


@pytest.fixture
def fake_pulumi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pulumi").write_text(FAKE_PULUMI)
    (bin_dir / "pulumi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PULUMI_CALLS", str(tmp_path / "calls"))
    monkeypatch.setenv("FAKE_PULUMI_OUTPUTS", str(tmp_path / "outputs.json"))
    monkeypatch.setenv("FAKE_PULUMI_SELECTED", "selected")
    for name in ("TRAINSTACK_STACK", "TRAINSTACK_WORKDIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "outputs.json"


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_stack_precedence(fake_pulumi: Path, project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_stack_name(None, project_dir) == "selected"
    monkeypatch.setenv("TRAINSTACK_STACK", "from-env")
    assert resolve_stack_name(None, project_dir) == "from-env"
    assert resolve_stack_name("from-flag", project_dir) == "from-flag"
    assert resolve_stack_name("org/proj/exp-1.a_b", project_dir) == "org/proj/exp-1.a_b"


@pytest.mark.parametrize("bad", ["../x", "a b", "x;y", "$(x)", "a/../b"])
def test_bad_stack_names(project_dir: Path, bad: str) -> None:
    with pytest.raises(UsageError, match="invalid stack name"):
        resolve_stack_name(bad, project_dir)


def _write_outputs(path: Path, outputs: contract.StackOutputs, **changes: object) -> None:
    raw = dict(outputs.raw)
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_workdir_and_config_from_the_stack_file(
    fake_pulumi: Path, local_sshd, project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_outputs(fake_pulumi, local_sshd.up())
    code = project_dir / "model"
    code.mkdir()
    (project_dir / "Pulumi.exp1.yaml").write_text(
        "config:\n"
        "  trainstack:workdir: model\n"
        "  trainstack:command: python train.py --lr 0.1\n"
        "  trainstack:results: [outputs, ckpt]\n"
        "  aws:region: us-east-1\n"
    )
    monkeypatch.chdir(tmp_path)
    target = resolve_target("exp1", project_dir=project_dir)
    assert target.workdir == code.resolve()
    assert target.command == "python train.py --lr 0.1"
    assert target.results == ("outputs", "ckpt")
    assert target.config["aws:region"] == "us-east-1"

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("TRAINSTACK_WORKDIR", "other")  # relative to where the user stands
    assert resolve_target("exp1", project_dir=project_dir).workdir == other.resolve()
    flag = tmp_path / "flag"
    flag.mkdir()
    assert resolve_target("exp1", str(flag), project_dir).workdir == flag.resolve()

    with pytest.raises(UsageError, match="does not exist"):
        resolve_target("exp1", str(tmp_path / "missing"), project_dir)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is not a directory"):
        resolve_target("exp1", str(tmp_path / "file"), project_dir)


@pytest.mark.parametrize(
    "results, message",
    [
        ('["/"]', "'/' is not relative to the workdir"),
        ('["."]', "'.' is the workdir itself"),
        ('["./"]', "'./' is the workdir itself"),
        ('["-rf"]', "'-rf' starts with '-'"),
        ('["../elsewhere"]', "'../elsewhere' leaves the workdir"),
        ("5", "must be a list of paths inside the workdir"),
    ],
)
def test_bad_results_dirs_are_refused_for_every_reader(
    fake_pulumi: Path, local_sshd, project_dir: Path, results: str, message: str
) -> None:
    _write_outputs(fake_pulumi, local_sshd.up())
    (project_dir / "Pulumi.exp1.yaml").write_text(f"config:\n  trainstack:results: {results}\n")
    with pytest.raises(UsageError, match=f"trainstack:results .*{re.escape(message)}"):
        resolve_target("exp1", project_dir=project_dir)


def test_results_dirs_are_normalised(fake_pulumi: Path, local_sshd, project_dir: Path) -> None:
    _write_outputs(fake_pulumi, local_sshd.up())
    (project_dir / "Pulumi.exp1.yaml").write_text("config:\n  trainstack:results: [./out/, out/sub, ckpt, ckpt]\n")
    assert resolve_target("exp1", project_dir=project_dir).results == ("out", "ckpt")


def test_a_workdir_inside_the_private_state_is_refused(fake_pulumi: Path, local_sshd, project_dir: Path) -> None:
    _write_outputs(fake_pulumi, local_sshd.up())
    inside = project_dir / ".trainstack" / "stacks"
    inside.mkdir(parents=True)
    for given in (inside, project_dir / ".trainstack"):
        with pytest.raises(UsageError, match="trainstack's private state"):
            resolve_target("exp1", str(given), project_dir)


def test_invalid_stack_file_is_a_usage_error(project_dir: Path) -> None:
    (project_dir / "Pulumi.broken.yaml").write_text("config: [unclosed\n")
    with pytest.raises(UsageError, match="Pulumi.broken.yaml is not valid YAML"):
        resolve_target("broken", project_dir=project_dir)


def test_outputs_are_cached_privately_and_reused(fake_pulumi: Path, local_sshd, project_dir: Path, tmp_path: Path) -> None:
    _write_outputs(fake_pulumi, local_sshd.up())
    first = resolve_target("exp1", project_dir=project_dir)
    assert first.outputs_source == "pulumi"
    cache = stack_state_dir(project_dir, "exp1") / "outputs.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    fake_pulumi.unlink()  # pulumi would now fail: the cache must answer
    second = resolve_target("exp1", project_dir=project_dir)
    assert second.outputs_source == "cache" and second.outputs == first.outputs
    assert sum("stack output" in call for call in _calls(tmp_path)) == 1


def test_stale_cache_is_refreshed_when_the_connection_fails(
    fake_pulumi: Path, local_sshd, project_dir: Path, tmp_path: Path
) -> None:
    outputs = local_sshd.up()
    stale_node = dict(outputs.raw[contract.Outputs.NODES][0], port=local.free_port())
    _write_outputs(fake_pulumi, outputs, nodes=[stale_node])
    resolve_target("exp1", project_dir=project_dir)  # caches the stale address
    _write_outputs(fake_pulumi, outputs)  # the machine moved; pulumi knows
    target = resolve_target("exp1", project_dir=project_dir)
    assert target.outputs_source == "cache" and target.outputs.head.port == stale_node["port"]
    with Connection(target, retry_seconds=3) as conn:
        assert conn.run("echo found").stdout == "found\n"
    assert target.outputs.head.port == outputs.head.port
    assert resolve_target("exp1", project_dir=project_dir).outputs.head.port == outputs.head.port


def test_unknown_stack_and_missing_outputs(fake_pulumi: Path, project_dir: Path) -> None:
    with pytest.raises(StackNotFound, match="unknown stack 'nosuch'"):
        resolve_target("nosuch", project_dir=project_dir)
    fake_pulumi.write_text("{}")
    with pytest.raises(OutputsMissing, match="has no outputs yet"):
        resolve_target("exp1", project_dir=project_dir)
    fake_pulumi.write_text(json.dumps({"nodes": [{"host": "127.0.0.1"}], "ssh_user": "u", "remote_root": "/r"}))
    with pytest.raises(OutputsMissing, match="missing the output 'ssh_host_public_key'"):
        resolve_target("exp1", project_dir=project_dir)


def test_without_the_pulumi_cli(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ":".join(d for d in os.environ["PATH"].split(":") if d and not Path(d, "pulumi").exists())
    monkeypatch.setenv("PATH", path)
    monkeypatch.delenv("TRAINSTACK_STACK", raising=False)
    with pytest.raises(StackNotFound, match="no stack selected"):
        resolve_target(project_dir=project_dir)
    with pytest.raises(StackNotFound, match="unknown stack 'exp9'.*local"):
        resolve_target("exp9", project_dir=project_dir)
    (project_dir / "Pulumi.exp9.yaml").write_text("config: {}\n")
    with pytest.raises(PulumiCliError, match="pulumi CLI is not on PATH"):
        resolve_target("exp9", project_dir=project_dir)

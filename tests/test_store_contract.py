"""The artifact store's names, pinned: a stack output, a remote file or a variable renamed is a
breaking change for existing stacks and machines. The machine's program (bootstrap/tools/
trainstack-store) and the laptop (trainstack/store.py) are held to the same names."""

from __future__ import annotations

import re

from trainstack import contract, store
from trainstack.contract import Outputs, Remote, RunEnv, StoreKeys


def test_store_output_names_are_pinned():
    assert (Outputs.STORE, Outputs.CHECKPOINT_DIRS, Outputs.CHECKPOINT_SYNC_MINUTES, Outputs.CHECKPOINT_SIGNAL,
            Outputs.CHECKPOINT_GRACE_SECONDS, Outputs.INSTANCE_PROFILE) == (
        "store", "checkpoint_dirs", "checkpoint_sync_minutes", "checkpoint_signal", "checkpoint_grace_seconds",
        "instance_profile",
    )
    assert set(Outputs.ALL) >= {Outputs.STORE, Outputs.CHECKPOINT_DIRS, Outputs.INSTANCE_PROFILE}


def test_store_remote_names_and_run_variables_are_pinned():
    assert (Remote.STORE_TOOL, Remote.STORE_ENV, Remote.MACHINE_ENV, Remote.RUN_INTERRUPTED) == (
        "bin/trainstack-store", "store.env", "machine.env", "interrupted",
    )
    assert (RunEnv.RESUME, RunEnv.RESUME_DIRS) == ("TRAINSTACK_RESUME", "TRAINSTACK_RESUME_DIRS")
    assert {RunEnv.RESUME, RunEnv.RESUME_DIRS} <= set(RunEnv.ALL)  # --env cannot set them
    assert (StoreKeys.WORKDIR, StoreKeys.RUNS) == ("workdir", "runs")


def test_the_machines_program_uses_the_contracts_names():
    tool = store.tool()
    assert Remote.RUN_INTERRUPTED in tool.RUN_RECORD
    assert {Remote.RUN_LOG, Remote.RUN_EXIT_CODE, Remote.RUN_COMMAND, Remote.RUN_ENV} <= set(tool.RUN_RECORD)
    text = store.TOOL.read_text()
    assert f'"{StoreKeys.WORKDIR}"' in text or f'workdir", relative' in text
    assert f'self.key("{StoreKeys.RUNS}"' in text
    # Every setting the laptop writes into store.env is one the program reads.
    outputs = contract.StackOutputs.parse("exp1", {
        Outputs.NODES: [{"host": "h"}], Outputs.SSH_USER: "u", Outputs.SSH_HOST_PUBLIC_KEY: "k", Outputs.REMOTE_ROOT: "/r",
        Outputs.STORE: "s3://b/p", Outputs.REGION: "eu-west-1", Outputs.CHECKPOINT_SYNC_MINUTES: 5,
    })
    written = {line.split("=", 1)[0] for line in store.node_settings(outputs, 1).splitlines()}
    read = set(re.findall(r'"(TRAINSTACK_[A-Z_]+)"', text))
    assert written <= read, sorted(written - read)
    assert store.node_settings(contract.StackOutputs.parse("exp1", {**outputs.raw, Outputs.STORE: ""}), 0) == ""

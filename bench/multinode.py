"""`python -m bench.multinode`: how long a first sync and `invoke train` take on N nodes against
one node, on the local target (N sshds on 127.0.0.1, each node with its own remote root).

With `--link home|office`, the laptop reaches every node through the emulated path of
`bench.link`, all nodes sharing one uplink (and one downlink) as they share a laptop's, while
the nodes reach each other directly, as over their group's own network. The bytes that cross
the uplink are counted.

The work per node runs in parallel (a thread and a connection per node), so starting on three
nodes should cost little more than on one: the target is at most 1.5 times the one-node time.

Two scenarios, each timed as a user types it (a fresh `invoke train` process, to the moment it
has printed the run id). The job itself is `sleep 1`: on the local target every node's job
runs on this one machine, and a job's own start-up (a Python interpreter, say) would compete
with the other nodes' start for its CPUs — on real machines it runs on its own node's.

* first sync: `invoke sync` to nodes that have never seen the project: time, and the bytes
  over the laptop's uplink (targets: ≤ 1.3× the time and ≤ 1.1× the bytes of one node);
* first start: a node that has never seen the project (fresh remote roots: the tools are
  installed, the whole tree is shipped, the venv built);
* next start: nothing changed since the last run (sync finds nothing to send).

Runs alternate between the one-node and the N-node target, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.link import PROFILES, Link, Wire
from bench.proxy import CountingProxy

REPO = Path(__file__).resolve().parent.parent
INVOKE = Path(sys.executable).with_name("invoke")
TARGET_RATIO = 1.5
SYNC_TIME_RATIO = 1.3
SYNC_BYTES_RATIO = 1.1
JOB = "sleep 1"


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def write_project(code: Path, files: int, seed: int) -> int:
    """A small training project: Python modules in packages and a requirements file; its size."""
    rng = random.Random(seed)
    total = 0
    for index in range(files):
        package = code / f"pkg{index % 10}"
        package.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{i}(x):\n    return x * {rng.randint(1, 999)}\n\n" for i in range(rng.randint(20, 80)))
        path = package / f"mod{index}.py"
        path.write_text(body)
        total += len(body)
    (code / "train.py").write_text("print('training')\n")
    (code / "requirements.txt").write_text("# the machine's own packages suffice\n")
    return total


def write_data(code: Path, mib: int, seed: int) -> int:
    """Incompressible data files (a tokenizer, a small dataset): what makes a first sync cost."""
    rng = random.Random(seed)
    (code / "data").mkdir(exist_ok=True)
    for index in range(mib):
        (code / "data" / f"part{index:03d}.bin").write_bytes(rng.randbytes(1 << 20))
    return mib << 20


def _env(code: Path, relay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a warm bytecode cache, as on a user's machine
    env.update(TRAINSTACK_STACK="local", TRAINSTACK_WORKDIR=str(code), NO_COLOR="1")
    if not relay:  # --no-relay: every node shipped from the laptop, to show what the relay saves
        env["TRAINSTACK_SYNC_RELAY"] = "off"
    return env


def invoke(project: Path, code: Path, *args: str, relay: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(INVOKE), "--search-root", str(REPO), *args], cwd=project, env=_env(code, relay),
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`invoke {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc


class Target:
    """One project with its local target of `nodes` nodes, reached through `link`."""

    def __init__(
        self, workspace: Path, code: Path, nodes: int, link: "Link", wires: "tuple[Wire, Wire]", relay: bool = True,
    ) -> None:
        self.project = workspace / f"project-{nodes}"
        self.project.mkdir()
        self.code = code
        self.nodes = nodes
        self.link = link
        self.wires = wires
        self.relay = relay
        self.proxies: list[CountingProxy] = []

    def fresh(self) -> None:
        """A target whose nodes have never seen the project (and no record of a sync here)."""
        self._close_proxies()
        invoke(self.project, self.code, "local.down")
        from trainstack import layout

        shutil.rmtree(layout.stack_state_dir(self.project, "local"), ignore_errors=True)
        invoke(self.project, self.code, "local.up", "--nodes", str(self.nodes))
        if self.link.shaped:
            self._through_link()

    def _through_link(self) -> None:
        from trainstack import contract, layout

        path = layout.local_outputs_path(self.project)
        raw = json.loads(path.read_text())
        for node in raw[contract.Outputs.NODES]:
            proxy = CountingProxy(
                node[contract.NodeKeys.HOST], int(node[contract.NodeKeys.PORT]), link=self.link, wires=self.wires,
            ).start()
            node[contract.NodeKeys.PORT] = proxy.port
            self.proxies.append(proxy)
        path.write_text(json.dumps(raw))

    def uplink_bytes(self) -> int:
        return sum(proxy.count().up for proxy in self.proxies)

    def sync(self) -> tuple[float, int]:
        """A first sync: seconds, and bytes over the uplink."""
        before = self.uplink_bytes()
        started = time.perf_counter()
        invoke(self.project, self.code, "sync", relay=self.relay)
        return time.perf_counter() - started, self.uplink_bytes() - before

    def start(self) -> float:
        started = time.perf_counter()
        proc = invoke(self.project, self.code, "train", "--command", JOB, relay=self.relay)
        elapsed = time.perf_counter() - started
        self._wait_ended(proc.stdout.strip().splitlines()[-1])
        return elapsed

    def _wait_ended(self, run_id: str) -> None:
        from trainstack import contract
        from trainstack.local import LocalTarget

        local = LocalTarget(self.project)
        deadline = time.monotonic() + 60
        for index in range(self.nodes):
            code = local.node_root(index) / contract.Remote.RUNS / run_id / contract.Remote.RUN_EXIT_CODE
            while not code.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run {run_id} did not end on node {index}")
                time.sleep(0.05)

    def _close_proxies(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        self.proxies = []

    def down(self) -> None:
        self._close_proxies()
        invoke(self.project, self.code, "local.down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multinode", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario and target (default 5); medians shown")
    parser.add_argument("--nodes", type=int, default=3, help="nodes of the larger target (default 3)")
    parser.add_argument("--files", type=int, default=600, help="Python modules in the project (default 600)")
    parser.add_argument("--data-mb", type=int, default=16, help="MiB of incompressible data in the project (default 16)")
    parser.add_argument("--link", choices=sorted(PROFILES), default="loopback",
                        help="the emulated path between the laptop and the nodes (default loopback: none)")
    parser.add_argument("--no-relay", action="store_true",
                        help="ship every node from the laptop (TRAINSTACK_SYNC_RELAY=off), for comparison")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.nodes < 2 or args.files < 1 or args.data_mb < 0:
        parser.error("--runs and --files must be at least 1, --nodes at least 2, --data-mb at least 0")
    link = PROFILES[args.link]

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 2**30 else None
    workspace = Path(tempfile.mkdtemp(prefix="trainstack-bench-multinode-", dir=base))
    results: dict[str, dict[int, Series]] = {"first sync": {}, "first start": {}, "next start": {}}
    uplink: dict[int, Series] = {}
    try:
        code = workspace / "code"
        size = write_project(code, args.files, seed=1) + write_data(code, args.data_mb, seed=1)
        wires = (Wire(), Wire())  # one laptop: its uplink and downlink, shared by every node's connection
        relay = not args.no_relay
        targets = [Target(workspace, code, n, link, wires, relay) for n in (1, args.nodes)]
        for scenario in results:
            for target in targets:
                results[scenario][target.nodes] = Series()
        for target in targets:
            uplink[target.nodes] = Series()
        for turn in range(args.runs):
            order = targets if turn % 2 == 0 else list(reversed(targets))
            for target in order:
                target.fresh()
                seconds, sent = target.sync()
                results["first sync"][target.nodes].seconds.append(seconds)
                uplink[target.nodes].seconds.append(sent)
                target.fresh()
                results["first start"][target.nodes].seconds.append(target.start())
                results["next start"][target.nodes].seconds.append(target.start())
        for target in targets:
            target.down()
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    print(f"the local target through {link.describe()}: {args.files + 2} files + {args.data_mb} MiB of data "
          f"({size / 2**20:.1f} MiB), median of {args.runs} runs, {os.cpu_count()} CPUs"
          + ("" if not args.no_relay else ", relay off"))
    print(f"{'scenario':<12} {'1 node':>9} {f'{args.nodes} nodes':>9} {'ratio':>6}  target")
    for scenario, by_nodes in results.items():
        one, many = by_nodes[1].median, by_nodes[args.nodes].median
        ratio = many / one
        limit = SYNC_TIME_RATIO if scenario == "first sync" else TARGET_RATIO
        verdict = "met" if ratio <= limit else "MISSED"
        print(f"{scenario:<12} {one:>8.2f}s {many:>8.2f}s {ratio:>5.2f}×  ≤ {limit}× {verdict}")
    if link.shaped:
        one, many = uplink[1].median, uplink[args.nodes].median
        ratio = many / one
        verdict = "met" if ratio <= SYNC_BYTES_RATIO else "MISSED"
        print(f"{'uplink bytes':<12} {one / 2**20:>6.1f}MiB {many / 2**20:>6.1f}MiB {ratio:>5.2f}×  "
              f"≤ {SYNC_BYTES_RATIO}× {verdict}  (first sync)")
    if args.json is not None:
        samples = {s: {str(n): series.seconds for n, series in by.items()} for s, by in results.items()}
        samples["first sync uplink bytes"] = {str(n): series.seconds for n, series in uplink.items()}
        args.json.write_text(json.dumps({"link": link.name, "samples": samples}, indent=2))
    # A missed target is a result, printed as such; only a run that could not be made fails.
    return 0


if __name__ == "__main__":
    sys.exit(main())

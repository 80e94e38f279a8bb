"""First boot through Debian's real cloud-init, not an emulation of it: a NoCloud seed holding
the exact bytes EC2 would serve (the program's gzip-compressed MIME user-data), cloud-init's own
stages run in order, and what cloud-init did checked at each point."""

from __future__ import annotations

import base64
import json

import pytest

from trainstack import contract

from .hosts import HostPool
from .machine import MachineKeys, bootstrap_inputs, user_data_for


def userdata_script(encoded: str) -> str:
    from infra.userdata import decode_user_data

    return decode_user_data(encoded)

pytestmark = pytest.mark.system

SEED = "/var/lib/cloud/seed/nocloud"
INSTANCE_ID = "i-0123456789abcdef0"

# What an Ubuntu cloud image configures: NoCloud in place of EC2's metadata service, the image's
# default user `ubuntu`, and the modules that matter before and around user scripts (disk,
# locale, apt mirror and package modules would reconfigure this test machine's tree for nothing).
CLOUD_CFG = """\
datasource_list: [NoCloud, None]
system_info:
  default_user:
    name: ubuntu
    lock_passwd: true
    shell: /bin/bash
cloud_init_modules: [seed_random, bootcmd, write_files, users_groups, ssh]
cloud_config_modules: [runcmd]
cloud_final_modules: [scripts_per_once, scripts_per_boot, scripts_per_instance, scripts_user, final_message]
"""

STAGES = (
    ["cloud-init", "init", "--local"],
    ["cloud-init", "init"],
    ["cloud-init", "modules", "--mode=config"],
)
FINAL = ["cloud-init", "modules", "--mode=final"]


def test_cloud_init_boots_the_machine_from_the_programs_user_data(host_pool: HostPool) -> None:
    host = host_pool.create("cloudinit")
    keys = MachineKeys.generate()
    inputs = bootstrap_inputs(keys)
    encoded = user_data_for(inputs)
    host.install_packages(["cloud-init", "openssh-server"])
    host.path("/etc/cloud/cloud.cfg.d").mkdir(parents=True, exist_ok=True)
    host.path("/etc/cloud/cloud.cfg.d/90-trainstack-test.cfg").write_text(CLOUD_CFG)
    seed = host.path(SEED)
    seed.mkdir(parents=True, exist_ok=True)
    # EC2 serves user_data_base64 decoded: the gzip bytes themselves.
    (seed / "user-data").write_bytes(base64.b64decode(encoded))
    (seed / "meta-data").write_text(f"instance-id: {INSTANCE_ID}\nlocal-hostname: cloudinit\n")

    for stage in STAGES:
        result = host.run(stage, check=False, timeout=300)
        assert result.returncode == 0, f"{stage}: {result.stdout.decode(errors='replace')[-3000:]}"

    # Before any user script: cloud-init itself pinned the host key and authorized the client.
    assert host.read_text("/etc/ssh/ssh_host_ed25519_key.pub").strip() == keys.host.public_line
    assert host.read_text("/etc/ssh/ssh_host_ed25519_key").strip() == keys.host.private_key_openssh.strip()
    assert not list(host.path("/etc/ssh").glob("ssh_host_rsa_key*"))  # ssh_deletekeys, no others generated
    authorized = host.read_text("/home/ubuntu/.ssh/authorized_keys").splitlines()
    assert keys.client.public_line in authorized
    assert not host.path(f"{inputs.remote_root}/{contract.Remote.READY}").exists()

    final = host.run(FINAL, check=False, timeout=900)
    assert final.returncode == 0, final.stdout.decode(errors="replace")[-3000:]
    # /var/lib/cloud/instance links to instances/<id>, resolved inside the host.
    ran = host.run(["cat", "/var/lib/cloud/instance/scripts/trainstack-bootstrap.sh"]).stdout.decode()
    assert ran == userdata_script(encoded)
    ready = json.loads(host.read_text(f"{inputs.remote_root}/{contract.Remote.READY}"))
    assert (ready["status"], ready["failed_step"]) == (contract.ReadyStatus.OK, None), host.read_text(
        f"{inputs.remote_root}/{contract.Remote.BOOTSTRAP_LOG}"
    )[-3000:]
    assert host.read_text("/etc/ssh/ssh_host_ed25519_key.pub").strip() == keys.host.public_line

    # A second boot of the same instance: cloud-init runs its stages, not the bootstrap again.
    log = host.read_text(f"{inputs.remote_root}/{contract.Remote.BOOTSTRAP_LOG}")
    for stage in (*STAGES, FINAL):
        result = host.run(stage, check=False, timeout=300)
        assert result.returncode == 0, f"{stage}: {result.stdout.decode(errors='replace')[-3000:]}"
    assert host.read_text(f"{inputs.remote_root}/{contract.Remote.BOOTSTRAP_LOG}") == log
    assert log.count("=== trainstack bootstrap started") == 1

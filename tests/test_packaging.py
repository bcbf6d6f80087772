"""The files that run meshnode as a service: the systemd unit (systemd-analyze), the
Dockerfiles (hadolint), the compose testnet (its nodes stay on loopback).

Building and running the images needs a container engine, which CI machines lack; what
was built and run by hand, and where, is in packaging/README.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "meshnode-serve@.service"
INSTALLED_EXEC = "/opt/meshnode/bin/meshnode"
# systemd-analyze security: 0 is fully locked down, 10 is an unprotected service; the
# unit scores 1.2 ("OK") with systemd 252. A change that weakens it fails here.
MAX_EXPOSURE = 2.0
TOOL_TIMEOUT_S = 60.0


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is missing: `make test` installs it (see Makefile test-deps)")
    return found


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with its ExecStart pointed at this venv's meshnode (verify checks that the
    binary exists); every other line is the shipped file's."""
    text = UNIT.read_text()
    assert INSTALLED_EXEC in text
    copy = tmp_path / "meshnode-serve@test.service"
    copy.write_text(text.replace(INSTALLED_EXEC, str(Path(sys.executable).parent / "meshnode")))
    return copy


def test_the_systemd_unit_verifies(unit_here: Path) -> None:
    done = subprocess.run([_tool("systemd-analyze"), "verify", str(unit_here)],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_the_systemd_unit_is_hardened(unit_here: Path) -> None:
    done = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit_here)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr
    assert float(found[1]) <= MAX_EXPOSURE, done.stdout
    text = UNIT.read_text()
    for setting in ("DynamicUser=yes", "StateDirectory=", "ProtectSystem=strict",
                    "NoNewPrivileges=yes", "Restart=on-failure", "SuccessExitStatus=130 143"):
        assert setting in text


@pytest.mark.parametrize("drop_ins", [("gpu.conf",), ("gpu.conf", "tdx.conf")],
                         ids=["gpu", "gpu-and-tdx"])
def test_the_unit_with_its_drop_ins_verifies_and_stays_hardened(
    unit_here: Path, tmp_path: Path, drop_ins: tuple[str, ...]
) -> None:
    """The GPU and TDX drop-ins loosen the unit on purpose (devices, a fixed user); they
    must still load, and the exposure must stay under the bound."""
    units = tmp_path / "units"
    (units / "meshnode-serve@.service.d").mkdir(parents=True)
    (units / "meshnode-serve@.service").write_text(unit_here.read_text())
    for name in drop_ins:
        shutil.copy(PACKAGING / "systemd" / name, units / "meshnode-serve@.service.d" / name)
    env = {"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{units}:"}  # ':' adds the defaults
    instance = "meshnode-serve@test.service"
    verify = subprocess.run([_tool("systemd-analyze"), "verify", instance], env=env,
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", instance],
        env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert found, security.stdout[-2000:] + security.stderr
    assert float(found[1]) <= MAX_EXPOSURE, security.stdout
    # The drop-ins were read: each one changes what the analysis reports.
    assert "✗ PrivateDevices=" in security.stdout  # gpu.conf opens the devices
    if "tdx.conf" in drop_ins:
        assert "static non-root user" in security.stdout  # tdx.conf: User=, no DynamicUser


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_a_dockerfile_passes_hadolint(dockerfile: str) -> None:
    done = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info",
         str(PACKAGING / dockerfile)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (PACKAGING / dockerfile).read_text()
    assert text.count("\nFROM ") == 2  # a build stage and a runtime stage
    assert re.search(r"^USER 10001:10001$", text, re.M)  # not root
    assert 'VOLUME ["/var/lib/meshnode"]' in text and "\nHEALTHCHECK " in text


def test_every_compose_node_binds_loopback_only() -> None:
    compose = yaml.safe_load((PACKAGING / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"bootstrap", "provider-1", "provider-2", "client"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert "ports" not in service, name  # host networking: binds are the command's
        args = service["command"]
        for flag in ("--listen", "--metrics", "--api"):
            if flag in args:
                value = args[args.index(flag) + 1]
                assert value.startswith(("127.0.0.1:", "/ip4/127.0.0.1/")), (name, value)
    assert services["bootstrap"]["command"][0] == "bootstrap"


def test_the_compose_entry_script_is_valid_sh() -> None:
    done = subprocess.run(["sh", "-n", str(PACKAGING / "docker" / "testnet-node.sh")],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr

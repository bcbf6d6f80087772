"""js-libp2p talks to a meshnode provider: TCP + Noise + yamux on 127.0.0.1, identify,
ping, a kad-dht lookup of the model's provider record, and typed Error frames on
/meshnode/job/1 for junk and for an Open of a model the provider does not serve.

The client is tests/interop/client.mjs with the versions pinned in
tests/interop/package.json; `make interop-deps` (part of `make test-deps`) installs them
under ~/.cache/meshnode/interop. Without node or those modules this test is skipped,
except under CI=true, where it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from meshnode.identity import NodeIdentity
from meshnode.node import ProviderSettings, provider_node
from meshnode.p2p.dht import provider_key
from meshnode.p2p.discovery import BootstrapNode
from meshnode.p2p.host import full_addrs, running_host

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent / "interop"
MODULES = Path(os.environ.get(
    "MESHNODE_INTEROP_MODULES", Path.home() / ".cache" / "meshnode" / "interop" / "node_modules"
))
CLIENT_TIMEOUT_S = 90.0  # node start + six steps of at most 15 s each on a busy box
ANNOUNCE_WAIT_S = 30.0  # the provider's first DHT announce after joining the bootstrap


def _node_or_skip() -> str:
    node = shutil.which("node")
    missing = [] if node else ["node"]
    if not (MODULES / "libp2p").is_dir():
        missing.append(str(MODULES / "libp2p"))
    if missing:
        reason = f"missing {', '.join(missing)}: run `make interop-deps`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert node is not None
    return node


async def _run_client(node: str, tmp: Path, args: list[str]) -> dict[str, dict[str, Any]]:
    # ESM resolves packages next to the script: run a copy beside a link to the modules.
    for name in ("client.mjs", "polyfill.mjs", "package.json"):
        (tmp / name).write_bytes((HERE / name).read_bytes())
    (tmp / "node_modules").symlink_to(MODULES, target_is_directory=True)
    with trio.fail_after(CLIENT_TIMEOUT_S):
        done = await trio.run_process(
            [node, str(tmp / "client.mjs"), *args], capture_stdout=True, capture_stderr=True,
            check=False, stdin=subprocess.DEVNULL,
        )
    steps: dict[str, dict[str, Any]] = {}
    for line in done.stdout.decode().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            steps[record["step"]] = record
    assert done.returncode == 0, (done.returncode, done.stderr.decode()[-3000:], steps)
    return steps


async def test_a_js_libp2p_client_identifies_pings_finds_and_gets_typed_job_errors(
    tmp_path: Path, tiny_engine: LlamaEngine
) -> None:
    node = _node_or_skip()
    async with running_host(NodeIdentity.generate()) as boot_host, trio.open_nursery() as nursery:
        await nursery.start(BootstrapNode(boot_host).run)
        boot_addr = full_addrs(boot_host)[0]
        settings = ProviderSettings(bootstrap=(boot_addr,))
        async with provider_node(
            tiny_engine, identity=NodeIdentity.generate(), settings=settings
        ) as provider:
            announcer = provider.announcer
            assert announcer is not None
            model_id = tiny_engine.info.model_id
            key = provider_key(model_id)
            # The provider record is stored once the announcer has joined and published.
            with trio.fail_after(ANNOUNCE_WAIT_S):
                while not boot_host_has_record(announcer, key):
                    await trio.sleep(0.2)
            addr = provider.addrs[0]
            steps = await _run_client(node, tmp_path, [addr, key, boot_addr])
        nursery.cancel_scope.cancel()

    print(json.dumps(steps, indent=1)[:4000])
    peer = addr.rsplit("/p2p/", 1)[1]
    assert steps["connect"]["ok"], steps["connect"]
    assert steps["connect"]["remote"] == peer
    assert steps["identify"]["ok"], steps["identify"]
    assert steps["identify"]["peer"] == peer
    assert "/meshnode/job/1" in steps["identify"]["protocols"]
    assert steps["ping"]["ok"], steps["ping"]
    assert steps["dht-find-providers"]["ok"], steps["dht-find-providers"]
    assert peer in steps["dht-find-providers"]["providers"]
    junk = steps["job-junk"]
    assert junk["ok"] and junk["answer"]["t"] == "error", junk
    assert junk["answer"]["code"] == "malformed_frame", junk
    unknown = steps["job-open-unknown-model"]
    assert unknown["ok"] and unknown["answer"]["t"] == "error", unknown
    assert unknown["answer"]["code"] == "unknown_model", unknown


def boot_host_has_record(announcer: Any, key: str) -> bool:
    dht = getattr(announcer, "dht", None)
    if dht is None:
        return False
    return bool(dht.provider_store.providers.get(bytes.fromhex(key)))

"""Operator endpoints on real nodes: a provider (tiny llama.cpp model, paid over a channel
whose real contract runs in the emulator) and a light client on 127.0.0.1. /metrics is
scraped over HTTP and read with prometheus_client's parser; status comes over the 0600
control socket as `meshnode status` reads it."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from libp2p.peer.id import ID
from ops_mesh import paid_mesh, steady
from pay_net import PRICE, WINDOW_TOKENS
from prometheus_client.parser import text_string_to_metric_families
from pytoniq_core.boc.cell import Cell

from meshnode.core.errors import MeshnodeError
from meshnode.identity import NodeIdentity
from meshnode.node import client_node, provider_node
from meshnode.ops.control import (
    ControlError,
    NodeNotRunning,
    request_status,
    serve_control,
    socket_path,
)
from meshnode.ops.http import MetricsBindRefused, parse_bind
from meshnode.ops.views import BootstrapView, ProviderView

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

MAX_TOKENS = 12

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.get(f"{url}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for fam in text_string_to_metric_families(reply.text):
        for s in fam.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, role: str, **labels: str) -> float:
    key = tuple(sorted({"role": role, **labels}.items()))
    return samples[name][key]


async def test_a_paid_job_shows_in_both_roles_metrics(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with paid_mesh(tmp_path, code, tiny_engine) as m:
        before = await scrape(m.provider_url)
        advert = await m.client.connect(m.provider.addrs[0])
        channel = await m.net.open_channel()
        await channel.announce(m.client.host, ID.from_base58(advert.peer_id))
        payer = channel.payer(PRICE, WINDOW_TOKENS)
        res = await m.client.ask(advert, "hello world", max_tokens=MAX_TOKENS,
                                 params=steady(tiny_engine), payer=payer)
        prov = await scrape(m.provider_url)
        client = await scrape(m.client_url)

    assert value(before, "meshnode_jobs_total", "provider", outcome="completed") == 0
    assert value(prov, "meshnode_jobs_total", "provider", outcome="completed") == 1
    assert value(prov, "meshnode_tokens_total", "provider", kind="completion") == MAX_TOKENS
    assert value(prov, "meshnode_tokens_total", "provider", kind="prompt") == (
        res.usage.prompt_tokens)
    assert value(prov, "meshnode_decode_tokens_per_second", "provider") > 0
    assert value(prov, "meshnode_queue_length", "provider") == 0
    assert value(prov, "meshnode_busy_total", "provider") == 0
    assert value(prov, "meshnode_vouchers_accepted_total", "provider") == len(payer.vouchers)
    assert value(prov, "meshnode_earnings_nanoton_total", "provider") == (
        payer.vouchers[-1].sent)
    assert value(prov, "meshnode_channels", "provider") == 1
    assert value(prov, "meshnode_runner_restarts_total", "provider") == 0
    assert value(prov, "meshnode_peers_connected", "provider") >= 1

    assert value(client, "meshnode_jobs_total", "client", outcome="completed") == 1
    assert value(client, "meshnode_tokens_total", "client", kind="completion") == MAX_TOKENS
    assert value(client, "meshnode_spent_nanoton_total", "client") == res.usage.cost_nanoton
    assert value(client, "meshnode_directory_adverts", "client", verification="verified") == 1
    assert value(client, "meshnode_advert_age_max_seconds", "client") >= 0


async def test_a_refused_job_is_counted_by_its_error_code(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    from meshnode.jobs.client import JobError

    async with paid_mesh(tmp_path, code, tiny_engine) as m:
        advert = await m.client.connect(m.provider.addrs[0])
        with pytest.raises(JobError) as refused:  # a priced provider, and no channel
            await m.client.ask(advert, "hello", max_tokens=4)
        prov = await scrape(m.provider_url)
        client = await scrape(m.client_url)
    code_seen = refused.value.code
    assert value(prov, "meshnode_errors_total", "provider", reason=code_seen) == 1
    assert value(client, "meshnode_errors_total", "client", reason=code_seen) == 1
    assert value(client, "meshnode_jobs_total", "client", outcome="failed") == 1


async def test_the_status_page_and_its_json_are_served_on_loopback(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with paid_mesh(tmp_path, code, tiny_engine) as m, httpx.AsyncClient() as http:
        page = await http.get(m.provider_url + "/")
        doc = (await http.get(m.provider_url + "/status.json")).json()
        client_doc = (await http.get(m.client_url + "/status.json")).json()
    assert page.status_code == 200 and "<title>meshnode status</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert doc["role"] == "provider" and doc["peer_id"] == m.provider.peer_id
    assert doc["models"][0]["id"] == tiny_engine.info.model_id
    assert doc["earnings"] == {"paid_nanoton": 0, "billed_nanoton": 0}
    client_id = str(m.client.host.get_id())
    assert client_doc["role"] == "client" and client_doc["peer_id"] == client_id
    assert client_doc["addrs"] and all(
        a.endswith(f"/p2p/{client_id}") and a.count("/p2p/") == 1 for a in client_doc["addrs"]
    )


async def test_status_over_the_control_socket_is_private_to_the_node_user(
    tmp_path: Path, tiny_engine: LlamaEngine
) -> None:
    home = tmp_path / "home"
    async with (
        provider_node(tiny_engine, identity=NodeIdentity.generate()) as prov,
        trio.open_nursery() as nursery,
    ):
        path = await nursery.start(serve_control, home, ProviderView(prov).status)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        folder_mode = stat.S_IMODE(os.stat(path.parent).st_mode)
        doc = await request_status(home)
        with pytest.raises(ControlError, match="another node is running with this home"):
            await serve_control(home, ProviderView(prov).status)
        nursery.cancel_scope.cancel()
    assert path == socket_path(home)
    assert mode == 0o600 and folder_mode == 0o700
    assert doc["role"] == "provider" and doc["peer_id"] == prov.peer_id
    assert doc["jobs"]["slots"] == 1 and doc["jobs"]["live"] == []
    assert not path.exists()  # removed on shutdown


async def test_status_says_no_node_runs_when_the_socket_is_missing(tmp_path: Path) -> None:
    with pytest.raises(NodeNotRunning, match="no node is running with home"):
        await request_status(tmp_path)


async def test_a_bootstrap_view_reports_its_peers_and_directory() -> None:
    from meshnode.core.directory import Directory
    from meshnode.p2p.host import running_host

    async with (
        running_host(NodeIdentity.generate(), "/ip4/127.0.0.1/tcp/0") as host,
        client_node() as client,
    ):
        view = BootstrapView(host, Directory())
        from meshnode.p2p.host import full_addrs, parse_peer_addr

        await client.host.connect(parse_peer_addr(full_addrs(host)[0]))
        with trio.fail_after(5):
            while not host.get_connected_peers():
                await trio.sleep(0.05)
        doc = await view.status()
        from meshnode.core.metrics_text import render

        text = render(await view.metrics(), {"role": "bootstrap"})
    assert doc["role"] == "bootstrap" and doc["connected_peer_count"] == 1
    assert str(client.host.get_id()) in doc["connected_peers"]
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"meshnode_peers_connected", "meshnode_directory_adverts"} <= names


@pytest.mark.parametrize("bind", ["0.0.0.0:9464", "192.0.2.1:9464"])
def test_metrics_refuse_a_non_loopback_address_unless_allowed(bind: str) -> None:
    with pytest.raises(MetricsBindRefused, match="not a loopback address"):
        parse_bind(bind, allow_remote=False)
    assert parse_bind(bind, allow_remote=True)[1] == 9464
    assert isinstance(MetricsBindRefused("x"), MeshnodeError)

"""The provider's status page in headless Chromium (Debian's package), driven by
playwright-core: a paid job done, a second one held mid-stream waiting for payment, and
the page showing the node, the live job, tok/s and earnings as a person sees them.

`make test` installs chromium (apt) and playwright-core (npm) first; run alone without
them, this test is skipped, except under CI=true, where it fails instead.
`MESHNODE_SCREENSHOT=docs/status-page.png` also keeps the screenshot there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from libp2p.peer.id import ID
from ops_mesh import paid_mesh, steady
from pay_net import PRICE, WINDOW_TOKENS
from pytoniq_core.boc.cell import Cell

from meshnode.core.messages import Usage
from meshnode.pay.metering.payer import ChannelPayer

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
SCRIPT = HERE / "browser" / "status_page.cjs"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Where `make browser-deps` installs playwright-core (outside the repository).
BROWSER_MODULES = Path(os.environ.get(
    "MESHNODE_BROWSER_MODULES", Path.home() / ".cache" / "meshnode" / "browser" / "node_modules"
))
BROWSER_TIMEOUT_S = 90.0  # Chromium's first start on a busy 2-core box is slow
HELD_TOKENS = 40  # the held job's budget: it stops after its first credit window


def _browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, BROWSER_MODULES / "playwright-core")
               if not p.exists()]
    if shutil.which("node") is None:
        missing.append("node")
    if missing:
        reason = f"missing {', '.join(missing)}: run `make browser-deps`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


class HeldPayer:
    """A real channel payer that pays its first voucher, then holds the next one until
    released: the provider keeps the job live, waiting for payment."""

    def __init__(self, inner: ChannelPayer) -> None:
        self.inner = inner
        self.release = trio.Event()
        self.holding = trio.Event()
        self.paid = 0

    @property
    def channel_id(self) -> int | None:
        return self.inner.channel_id

    def begin(self, prompt: str) -> None:
        self.inner.begin(prompt)

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes | None:
        return self.inner.authorize(job_id, client_pub, provider_peer_id)

    async def voucher_for(self, owed: int, received: int) -> bytes:
        if self.paid >= 2:
            self.holding.set()
            await self.release.wait()
        self.paid += 1
        return await self.inner.voucher_for(owed, received)

    def check_usage(self, usage: Usage) -> None:
        self.inner.check_usage(usage)

    def channel_key(self) -> bytes | None:
        return self.inner.channel_key()

    def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
        self.inner.accepted(prompt_tokens, owed_before)

    async def finish(self, received: int, complete: bool) -> None:
        await self.inner.finish(received, complete)

    @property
    def charged(self) -> int:
        return self.inner.charged


async def test_the_status_page_shows_the_node_a_live_job_tok_s_and_earnings_in_chromium(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    _browser_or_skip()
    shot = tmp_path / "status-page.png"
    async with paid_mesh(tmp_path, code, tiny_engine) as m, trio.open_nursery() as nursery:
        advert = await m.client.connect(m.provider.addrs[0])
        channel = await m.net.open_channel()
        await channel.announce(m.client.host, ID.from_base58(advert.peer_id))
        await m.client.ask(advert, "hello world", max_tokens=16, params=steady(tiny_engine),
                           payer=channel.payer(PRICE, WINDOW_TOKENS))
        held = HeldPayer(channel.payer(PRICE, WINDOW_TOKENS))

        async def held_job() -> None:
            await m.client.ask(advert, "a second question", max_tokens=HELD_TOKENS,
                               params=steady(tiny_engine), payer=held)

        nursery.start_soon(held_job)
        with trio.fail_after(30):
            await held.holding.wait()
        browser = await trio.run_process(
            ["node", str(SCRIPT), m.provider_url + "/", str(shot)],
            capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "NODE_PATH": str(BROWSER_MODULES), "CHROMIUM": str(CHROMIUM)},
        )
        held.release.set()
    assert browser.returncode == 0, browser.stderr.decode()[-3000:]
    seen = json.loads(browser.stdout)
    assert seen["title"] == "meshnode status" and seen["errors"] == []
    assert seen["role"] == "provider" and seen["peer"] == m.provider.peer_id
    assert seen["live"] == "1"
    (live_row,) = seen["liveRows"]
    assert str(m.client.host.get_id()) in live_row
    assert float(seen["tokps"]) > 0
    assert seen["earned"].endswith(" TON") and float(seen["earned"].split()[0]) > 0
    assert any("tiny-llama-random" in row and "(this node)" in row for row in seen["meshRows"])
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("MESHNODE_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)

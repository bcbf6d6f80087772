"""The announcer's gossip loop on a virtual clock: no hosts, no sleeps."""

from __future__ import annotations

import hashlib

import trio
import trio.testing

from meshnode.identity import NodeIdentity
from meshnode.p2p.discovery import ProviderAnnouncer
from meshnode.p2p.host import make_host

REPUBLISH_S = 3600.0  # the periodic publish: far beyond anything the test waits for
LOAD_INTERVAL_S = 5.0


class SlowPublisher:
    """An ``AdvertPublisher`` whose publish takes ``publish_s`` virtual seconds; calls
    ``during_first`` while the first publish is in flight."""

    def __init__(self, publish_s: float) -> None:
        self.publish_s = publish_s
        self.times: list[float] = []
        self.during_first: list[ProviderAnnouncer] = []

    def has_topic_peers(self) -> bool:
        return True

    async def publish(self, signed_advert: bytes) -> None:
        self.times.append(trio.current_time())
        await trio.sleep(self.publish_s / 2)
        if len(self.times) == 1:
            for announcer in self.during_first:
                announcer.load_changed()
        await trio.sleep(self.publish_s / 2)


def _announcer() -> ProviderAnnouncer:
    model = hashlib.sha256(b"wake-up").hexdigest()
    return ProviderAnnouncer(
        make_host(NodeIdentity.generate()),  # never started: the loop does not touch it
        lambda: b"advert",
        [model],
        [],
        republish_s=REPUBLISH_S,
        load_publish_min_interval_s=LOAD_INTERVAL_S,
    )


async def test_a_load_change_during_a_publish_is_published_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    announcer = _announcer()
    publisher = SlowPublisher(publish_s=1.0)
    publisher.during_first.append(announcer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer._gossip_loop, publisher)
        with trio.fail_after(REPUBLISH_S / 2):
            while len(publisher.times) < 2:
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    # The change arrived mid-publish: the next publish is debounced, not the periodic one.
    assert publisher.times[1] - publisher.times[0] <= LOAD_INTERVAL_S + 1.0


async def test_a_load_change_while_idle_is_published_after_the_debounce(
    autojump_clock: trio.testing.MockClock,
) -> None:
    announcer = _announcer()
    publisher = SlowPublisher(publish_s=0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer._gossip_loop, publisher)
        await trio.sleep(1.0)
        announcer.load_changed()
        with trio.fail_after(REPUBLISH_S / 2):
            while len(publisher.times) < 2:
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert publisher.times[1] - publisher.times[0] == LOAD_INTERVAL_S

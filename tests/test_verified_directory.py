"""The client's verified directory: each new advert's evidence is checked once, even when
the background verifier and a query (`find`, `peers`) ask at the same moment."""

from __future__ import annotations

import time

import trio
from test_directory import signed

from meshnode.attest.verifier import EvidenceVerifier
from meshnode.client.verified import VerifiedDirectory
from meshnode.core.advert import Advert
from meshnode.core.attest_policy import Verdict

# A TDX quote is verified in a worker thread; this stands in for that wait.
SLOW_VERIFY_S = 0.05
PROVIDERS = 3


class CountingDirectory(VerifiedDirectory):
    """The real directory and verifier; counts the verifications and makes each one wait,
    as a quote verification does."""

    def __init__(self) -> None:
        super().__init__(allow_insecure=True)
        self.verified: list[str] = []

    async def _verify(self, advert: Advert, now: float) -> Verdict:
        self.verified.append(advert.peer_id)
        await trio.sleep(SLOW_VERIFY_S)
        return await super()._verify(advert, now)


async def test_an_advert_is_verified_once_when_two_tasks_ask_at_the_same_time() -> None:
    directory = CountingDirectory()
    assert isinstance(directory.verifier, EvidenceVerifier)
    for n in range(PROVIDERS):
        result = directory.directory.insert(signed(n, issued=time.time()), time.time())
        assert result.accepted and result.needs_verification
    async with trio.open_nursery() as nursery:
        nursery.start_soon(directory.verify_pending)  # the background verify_loop
        nursery.start_soon(directory.verify_pending)  # a query at the same moment
    assert sorted(directory.verified) == sorted(set(directory.verified))
    assert len(directory.verified) == PROVIDERS
    # Both callers return only once every pending advert has its verdict.
    assert not directory.directory.pending_verification(time.time())

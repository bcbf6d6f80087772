"""The client's directory of adverts, each verified against the attestation policy.

`Directory` (core) keeps adverts and their verification state; this shell verifies the
evidence of new ones, in a background task for adverts that discovery inserts, and
remembers which providers run without a TEE (allowed only with the insecure flag).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import trio

from meshnode.attest.evidence import Evidence
from meshnode.attest.policy_file import load_policy
from meshnode.attest.verifier import EvidenceVerifier
from meshnode.core.advert import Advert
from meshnode.core.attest_policy import Reason, Verdict
from meshnode.core.directory import Directory, InsertResult
from meshnode.p2p.discovery import ClientDiscovery

log = logging.getLogger(__name__)


class VerifiedDirectory:
    def __init__(self, *, allow_insecure: bool = False, policy_path: Path | None = None) -> None:
        policy = load_policy(policy_path)
        self.allow_insecure = allow_insecure or policy.allow_dev
        self.directory = Directory()
        self.verifier = EvidenceVerifier(policy, allow_insecure=self.allow_insecure)
        self.insecure: dict[str, bool] = {}
        self._unverified = trio.Event()
        # One verification pass at a time: the background loop and a query (`find`) would
        # otherwise both verify the same pending advert (twice the quote checks); a caller
        # that waits here then finds its answer already made.
        self._verify_lock = trio.Lock()

    @property
    def adverts(self) -> dict[str, Advert]:
        return {lst.peer_id: lst.advert for lst in self.directory.peers(time.time())}

    async def add(self, data: bytes) -> InsertResult:
        """Insert a signed advert and verify its attestation if it is new."""
        result = self.directory.insert(data, time.time())
        if result.accepted and result.needs_verification:
            await self.verify_pending()
        return result

    def on_discovered(self, result: InsertResult) -> None:
        """Discovery inserted an advert (sync callback): verification runs in its task."""
        if result.accepted and result.needs_verification:
            self._unverified.set()

    async def verify_pending(self) -> None:
        async with self._verify_lock:
            now = time.time()
            for listing in self.directory.pending_verification(now):
                advert = listing.advert
                verdict = await self._verify(advert, now)
                self.directory.set_verification(
                    advert.peer_id, verdict.ok, f"{verdict.reason}: {verdict.message}",
                    seq=advert.seq,
                )
                self.insecure[advert.peer_id] = verdict.insecure
                log.debug("advert of %s seq %d: attestation %s", advert.peer_id, advert.seq,
                          verdict.reason)

    async def verify_loop(self) -> None:
        while True:
            await self._unverified.wait()
            self._unverified = trio.Event()
            await self.verify_pending()

    async def find(self, model: str, discovery: ClientDiscovery | None) -> int:
        """Providers of `model` that pass verification, asking the mesh if none is known."""
        await self.verify_pending()  # an unchecked listing may already be the answer
        known = [p for p in self.directory.providers_for(model, time.time())
                 if p.listing.verified]
        if not known and discovery is not None:
            await discovery.find(model)
            await self.verify_pending()
            known = [p for p in self.directory.providers_for(model, time.time())
                     if p.listing.verified]
        return len(known)

    async def _verify(self, advert: Advert, now: float) -> Verdict:
        try:
            evidence = Evidence.from_dict(advert.attestation)
        except Exception as exc:  # evidence is peer-controlled: any parse error rejects
            return Verdict.reject(Reason.MALFORMED, f"unreadable evidence: {exc}")
        return await self.verifier.verify_async(
            evidence,
            peer_id=advert.peer_id,
            job_pub=advert.job_pubkey,
            peer_pub=advert.peer_pubkey,
            now=now,
        )

    def verification(self, peer_id: str) -> str:
        listing = self.directory.get(peer_id, time.time())
        return "unknown" if listing is None else listing.verification_reason

    def verified_advert(self, peer_id: str) -> Advert:
        """The verified advert of `peer_id` (PermissionError if there is none)."""
        listing = self.directory.get(peer_id, time.time())
        if listing is None or not listing.verified:
            reason = "not listed" if listing is None else listing.verification_reason
            raise PermissionError(
                f"provider {peer_id} is not verified ({reason}); a dev provider needs "
                "the explicit insecure flag"
            )
        return listing.advert

    def advert_of(self, peer_id: str | None, channel_key: bytes | None = None) -> Advert | None:
        """The freshest live, verified advert of the peer, or of whoever advertises that
        TON channel key (a provider may come back under another peer id)."""
        found = [
            lst.advert
            for lst in self.directory.peers(time.time())
            if lst.verified and (
                lst.advert.peer_id == peer_id
                or (lst.advert.ton is not None and lst.advert.ton.channel_pubkey == channel_key)
            )
        ]
        return max(found, key=lambda a: a.issued_at, default=None)

"""Bad input on a real libp2p stream closes only that stream; the next job succeeds."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import libp2p.security.secio.transport as secio
import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmDialAllFailedError
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from nacl.public import PrivateKey

from meshnode.attest.dev import DevEvidenceProducer
from meshnode.attest.local import make_evidence
from meshnode.core.advert import Advert, Capacity, Load, ModelOffer, encode_signed
from meshnode.core.crypto import Opener, Sealer, client_session, provider_session
from meshnode.core.messages import JOB_PROTOCOL, Accept, ErrorMsg, Open, Sealed, parse_message
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.core.wire import FrameDecoder, encode_frame, encode_uvarint
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.identity import NodeIdentity
from meshnode.jobs.client import JobError, JobRequest, run_job
from meshnode.node import ClientNode, ProviderNode, client_node, provider_node
from meshnode.p2p.advert_exchange import ADVERT_PROTOCOL, serve_advert
from meshnode.p2p.framed import FramedStream
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host

pytestmark = pytest.mark.slow


@pytest.fixture
async def mesh(tiny_engine: LlamaEngine) -> AsyncIterator[tuple[ProviderNode, ClientNode]]:
    async with provider_node(tiny_engine, identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            await client.connect(prov.addrs[0])
            yield prov, client


async def _raw_exchange(client: ClientNode, prov: ProviderNode, data: bytes) -> dict[str, Any]:
    """Write raw bytes on a fresh job stream, half-close, return the provider's reply."""
    stream = await client.host.new_stream(prov.host.get_id(), [TProtocol(JOB_PROTOCOL)])
    await stream.write(data)
    await stream.close()
    dec = FrameDecoder()
    frames: list[dict[str, Any]] = []
    with trio.fail_after(10):
        while not frames:
            try:
                chunk = await stream.read(4096)
            except Exception:
                break
            if not chunk:
                break
            frames += dec.feed(chunk)
    assert frames, "provider closed without saying why"
    return frames[0]


def _open(engine: LlamaEngine, client_key: PrivateKey, sealer: Sealer, job_id: bytes) -> Open:
    return Open(
        job_id=job_id,
        model_id=engine.info.model_id,
        params={"temperature": 0.0},
        max_tokens=4,
        channel_id=None,
        client_pub=bytes(client_key.public_key),
        header=sealer.header,
    )


def _bad_inputs(prov: ProviderNode, engine: LlamaEngine) -> dict[str, bytes]:
    good_open = encode_frame(
        Open(
            job_id=os.urandom(16),
            model_id=engine.info.model_id,
            params={},
            max_tokens=4,
            channel_id=None,
            client_pub=os.urandom(32),
            header=os.urandom(24),
        ).to_wire()
    )
    wrong_schema = dict(parse_message(FrameDecoder().feed(good_open)[0]).to_wire())
    wrong_schema["max_tokens"] = "lots"
    junk = b"\xc1\xc1\xc1\xc1"
    return {
        "truncated_frame": good_open[:-5],
        "frame_too_large": encode_uvarint(4 << 20) + b"x" * 16,
        "malformed_frame": encode_uvarint(len(junk)) + junk,
        "schema": encode_frame(wrong_schema),
        "unknown_message": encode_frame({"t": "gimme", "x": 1}),
    }


@pytest.mark.parametrize(
    "case", ["truncated_frame", "frame_too_large", "malformed_frame", "schema", "unknown_message"]
)
async def test_bad_frame_closes_only_its_stream(
    case: str, tiny_engine: LlamaEngine, mesh: tuple[ProviderNode, ClientNode]
) -> None:
    prov, client = mesh
    reply = await _raw_exchange(client, prov, _bad_inputs(prov, tiny_engine)[case])
    assert reply == {"t": "error", "code": case, "msg": reply["msg"]}
    assert prov.jobs.stats.errors == {case: 1}
    advert = client.adverts[prov.peer_id]
    params = {"temperature": 0.0, "logit_bias": steady_logit_bias(tiny_engine)}
    res = await client.ask(advert, "still there?", max_tokens=5, params=params)
    assert res.usage.completion_tokens == 5


async def test_flipped_ciphertext_byte_is_detected(
    tiny_engine: LlamaEngine, mesh: tuple[ProviderNode, ClientNode]
) -> None:
    prov, client = mesh
    key = PrivateKey.generate()
    job_id = os.urandom(16)
    sealer = Sealer(client_session(key, prov.identity.job_public).send, job_id)
    sealed = bytearray(sealer.seal({"k": "prompt", "prompt": "secret question"}))
    sealed[5] ^= 0x01
    data = encode_frame(_open(tiny_engine, key, sealer, job_id).to_wire()) + encode_frame(
        Sealed(bytes(sealed)).to_wire()
    )
    reply = await _raw_exchange(client, prov, data)
    assert parse_message(reply) == ErrorMsg(code="seal", msg=reply["msg"])
    assert prov.jobs.stats.jobs_started == 0


def _insecure_host(kind: str) -> Any:
    kp = create_new_key_pair()
    sec = (
        {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)}
        if kind == "plaintext"
        else {TProtocol(secio.ID): secio.Transport(kp)}
    )
    return new_host(key_pair=kp, sec_opt=sec)


# Refusing a dialer that offers no Noise is one multistream round trip on loopback; a
# refusal slower than this is a hang, not a refusal.
INSECURE_DIAL_REFUSAL_S = 10.0


@pytest.mark.parametrize("kind", ["plaintext", "secio"])
async def test_dialer_without_noise_is_refused(
    kind: str, mesh: tuple[ProviderNode, ClientNode]
) -> None:
    prov, _ = mesh
    host = _insecure_host(kind)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(INSECURE_DIAL_REFUSAL_S):
            with pytest.raises(SwarmDialAllFailedError) as info:
                await host.connect(parse_peer_addr(prov.addrs[0]))
        assert "failed to negotiate the secure protocol" in str(info.value.__cause__)
        assert prov.host.get_id() not in host.get_network().connections


async def _accept_any_job(stream: Any, identity: NodeIdentity) -> tuple[FramedStream, Sealer]:
    """A hand-written provider's half of the handshake: read Open and the sealed prompt,
    answer Accept; the caller then sends whatever token frames the test needs."""
    fs = FramedStream(stream)
    first = await fs.recv(10)
    assert isinstance(first, Open)
    keys = provider_session(identity.job_key, first.client_pub)
    prompt = await fs.recv(10)
    assert isinstance(prompt, Sealed)
    Opener(keys.recv, first.header, first.job_id).open(prompt.ciphertext)
    sealer = Sealer(keys.send, first.job_id)
    await fs.send(Accept(header=sealer.header))
    return fs, sealer


async def test_client_refuses_a_provider_that_inflates_the_token_count() -> None:
    liar_id = NodeIdentity.generate()

    async def liar(stream: Any) -> None:
        fs, sealer = await _accept_any_job(stream, liar_id)
        await fs.send(Sealed(sealer.seal({"k": "tokens", "text": "ok", "n": 4000,
                                          "total": 4000})))
        await trio.sleep(5)

    async with running_host(liar_id) as host, client_node() as client:
        host.set_stream_handler(TProtocol(JOB_PROTOCOL), liar)
        info = parse_peer_addr(full_addrs(host)[0])
        await client.host.connect(info)
        got: list[str] = []

        async def on_text(t: str) -> None:
            got.append(t)

        with pytest.raises(JobError) as err:
            await run_job(client.host, info.peer_id, liar_id.job_public,
                          JobRequest("ab" * 32, "hi", 8000, {}), on_text=on_text)
    assert err.value.code == "schema" and got == []


async def test_a_provider_trickling_tokens_cannot_hold_a_client_past_its_deadline() -> None:
    slow_id = NodeIdentity.generate()
    model = "ab" * 32

    async def trickle(stream: Any) -> None:
        fs, sealer = await _accept_any_job(stream, slow_id)
        for total in range(1, 10_000):
            await fs.send(Sealed(sealer.seal({"k": "tokens", "text": "a", "n": 1,
                                              "total": total})))
            await trio.sleep(0.2)

    async with running_host(slow_id) as host, client_node(allow_insecure=True) as client:

        now = time.time()
        evidence = await make_evidence(DevEvidenceProducer(slow_id.signing_key),
                                       slow_id.job_public, slow_id.peer_public, now)

        signed = encode_signed(Advert(
            peer_id=peer_id_from_ed25519(slow_id.peer_public), peer_pubkey=slow_id.peer_public,
            addrs=tuple(full_addrs(host)),
            models=(ModelOffer(model, "slow", "F32", 512, 0, 0),),
            capacity=Capacity(1, 1.0), load=Load(0, 0), job_pubkey=slow_id.job_public,
            seq=1, issued_at=now, expires_at=now + 300, attestation=evidence.to_dict(),
        ), slow_id.peer_seed)

        async def advert_handler(stream: Any) -> None:
            await serve_advert(stream, signed)

        host.set_stream_handler(TProtocol(JOB_PROTOCOL), trickle)
        host.set_stream_handler(TProtocol(ADVERT_PROTOCOL), advert_handler)
        advert = await client.connect(full_addrs(host)[0])
        client.job_deadline_s = 1.0
        t0 = time.monotonic()
        with pytest.raises(JobError) as err:
            await client.ask(advert, "hi", max_tokens=5000)
        assert err.value.code == "deadline" and time.monotonic() - t0 < 5

"""A job may name a payment channel only with the channel client key's proof, bound to
the job id, the client's ephemeral key, the channel and the provider it is sent to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from pay_net import DEPOSIT, PRICE, PROVIDER_PEER_ID, WINDOW_TOKENS, job_open

from meshnode.core.channel_auth import (
    ChannelAuthError,
    job_auth_message,
    sign_job_auth,
    verify_job_auth,
)
from meshnode.core.messages import Open, SchemaError, parse_message
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.core.voucher import VoucherSigner
from meshnode.jobs.payment_gate import PaymentRejected
from meshnode.pay.channel.ledger import ChannelRecord, Ledger
from meshnode.pay.metering.gates import CHANNEL_BUSY_WAIT_S, ChannelGates

SIGNER = VoucherSigner(bytes([7]) * 32)
JOB_ID = bytes([1]) * 16
CLIENT_PUB = bytes([2]) * 32
CHANNEL_ID = 0xC0FFEE
OTHER_PROVIDER = peer_id_from_ed25519(bytes([0xEE]) * 32)


def proof() -> bytes:
    return sign_job_auth(SIGNER, JOB_ID, CLIENT_PUB, CHANNEL_ID, PROVIDER_PEER_ID)


def check(auth: bytes | None, key: bytes = SIGNER.public_key) -> None:
    verify_job_auth(key, auth, JOB_ID, CLIENT_PUB, CHANNEL_ID, PROVIDER_PEER_ID)


def test_a_proof_verifies_for_the_job_key_channel_and_provider_it_names() -> None:
    check(proof())


@pytest.mark.parametrize(
    ("job_id", "client_pub", "channel_id", "provider"),
    [
        (bytes([9]) * 16, CLIENT_PUB, CHANNEL_ID, PROVIDER_PEER_ID),
        (JOB_ID, bytes([9]) * 32, CHANNEL_ID, PROVIDER_PEER_ID),
        (JOB_ID, CLIENT_PUB, CHANNEL_ID + 1, PROVIDER_PEER_ID),
        (JOB_ID, CLIENT_PUB, CHANNEL_ID, OTHER_PROVIDER),
    ],
    ids=["job_id", "client_pub", "channel_id", "provider"],
)
def test_a_proof_made_for_anything_else_is_refused(
    job_id: bytes, client_pub: bytes, channel_id: int, provider: str
) -> None:
    with pytest.raises(ChannelAuthError, match="not signed"):
        check(sign_job_auth(SIGNER, job_id, client_pub, channel_id, provider))


def test_a_proof_signed_by_another_key_is_refused() -> None:
    other = VoucherSigner(bytes([8]) * 32)
    auth = sign_job_auth(other, JOB_ID, CLIENT_PUB, CHANNEL_ID, PROVIDER_PEER_ID)
    with pytest.raises(ChannelAuthError, match="not signed"):
        check(auth)


def test_a_missing_proof_is_refused() -> None:
    with pytest.raises(ChannelAuthError, match="no proof"):
        check(None)


def test_a_proof_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ChannelAuthError, match="64 bytes"):
        check(proof()[:63])


def test_the_signed_message_is_not_a_cell_hash() -> None:
    # Vouchers and contract messages sign 32-byte hashes; a longer message can never
    # be mistaken for one of them.
    assert len(job_auth_message(JOB_ID, CLIENT_PUB, CHANNEL_ID, PROVIDER_PEER_ID)) > 32


def test_a_message_for_an_out_of_range_channel_is_refused() -> None:
    with pytest.raises(ChannelAuthError, match="uint128"):
        job_auth_message(JOB_ID, CLIENT_PUB, 1 << 128, PROVIDER_PEER_ID)


# --- on the wire ---------------------------------------------------------------------


def open_msg(auth: bytes | None) -> Open:
    return Open(
        job_id=JOB_ID,
        model_id="ab" * 32,
        params={},
        max_tokens=8,
        channel_id=CHANNEL_ID,
        client_pub=CLIENT_PUB,
        header=bytes(24),
        auth=auth,
    )


def test_an_open_carries_its_proof_through_the_wire() -> None:
    msg = open_msg(proof())
    assert parse_message(msg.to_wire()) == msg


def test_an_open_without_a_proof_leaves_the_key_out() -> None:
    wire = open_msg(None).to_wire()
    assert "auth" not in wire
    assert parse_message(wire) == open_msg(None)


def test_an_open_with_a_null_proof_reads_as_none() -> None:
    wire = open_msg(None).to_wire() | {"auth": None}
    assert parse_message(wire) == open_msg(None)


@pytest.mark.parametrize("bad", [bytes(63), bytes(65), "x" * 64, 7])
def test_an_open_with_a_malformed_proof_is_a_schema_error(bad: object) -> None:
    with pytest.raises(SchemaError, match="auth"):
        parse_message(open_msg(None).to_wire() | {"auth": bad})


# --- at the provider's gate ----------------------------------------------------------


def gates_with_channel(tmp_path: Path) -> ChannelGates:
    ledger = Ledger(tmp_path / "provider")
    ledger.add_channel(ChannelRecord(CHANNEL_ID, SIGNER.public_key, DEPOSIT, 0.0))
    return ChannelGates(ledger, PRICE, WINDOW_TOKENS)


async def test_the_gate_admits_a_job_with_the_channel_keys_proof(tmp_path: Path) -> None:
    gates = gates_with_channel(tmp_path)
    gate = gates(job_open(CHANNEL_ID, signer=SIGNER), PROVIDER_PEER_ID)
    await gate.admit()
    await gate.start(prompt_tokens=2)
    assert gate.may_produce(0)
    await gate.finish()


async def test_the_gate_refuses_a_job_without_a_proof_without_waiting_for_the_channel(
    tmp_path: Path,
) -> None:
    gates = gates_with_channel(tmp_path)
    owner = gates(job_open(CHANNEL_ID, signer=SIGNER), PROVIDER_PEER_ID)
    await owner.admit()
    await owner.start(prompt_tokens=2)  # holds the channel's one slot
    intruder = gates(job_open(CHANNEL_ID, os.urandom(16), key=SIGNER.public_key),
                     PROVIDER_PEER_ID)
    # Refused at once: checked before queueing for the slot (which would end in
    # channel_busy after CHANNEL_BUSY_WAIT_S).
    with trio.fail_after(CHANNEL_BUSY_WAIT_S / 2), pytest.raises(PaymentRejected) as info:
        await intruder.admit()
    assert info.value.code == "channel_auth"
    await intruder.finish()
    await owner.finish()


async def test_the_gate_refuses_a_proof_made_for_another_provider(tmp_path: Path) -> None:
    gates = gates_with_channel(tmp_path)
    replayed = job_open(CHANNEL_ID, signer=SIGNER, provider_peer_id=OTHER_PROVIDER)
    gate = gates(replayed, PROVIDER_PEER_ID)
    with pytest.raises(PaymentRejected) as info:
        await gate.admit()
    assert info.value.code == "channel_auth"

"""Proof that a job's Open may draw on the payment channel it names.

A channel id is no secret (it is on chain), so a provider must not let whoever names one
hold the channel's job slot or run up its credit window. The client signs, with the
channel's party-A key (the key that signs its vouchers), a message binding the job id,
its ephemeral X25519 key, the channel and the provider's peer id: the proof cannot be
replayed to another provider, another job or another channel, and a stranger who saw it
on the wire cannot pair it with a key of their own (the provider seals to `client_pub`).

Vouchers and contract messages are signatures over 32-byte cell hashes; this message is
longer and starts with its own tag, so no job proof is ever a valid voucher or the
reverse. Sans-io: pure computation.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.signing

from meshnode.core.messages import JOB_ID_BYTES, X25519_KEY_BYTES
from meshnode.core.voucher import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, VoucherSigner

JOB_AUTH_TAG = b"meshnode/job-channel-auth/1\x00"
"""Domain tag: a signature made for this purpose verifies for nothing else."""

CHANNEL_ID_BYTES = 16  # channel ids are uint128 in the contract
MAX_PEER_ID_BYTES = 255  # one length byte; Ed25519 peer ids are ~52 characters
JOB_AUTH_BYTES = SIGNATURE_BYTES


class ChannelAuthError(ValueError):
    """The Open's channel proof is missing, malformed or not signed by the channel."""


def job_auth_message(
    job_id: bytes, client_pub: bytes, channel_id: int, provider_peer_id: str
) -> bytes:
    """The bytes the channel's client key signs for one job at one provider."""
    if len(job_id) != JOB_ID_BYTES:
        raise ChannelAuthError(f"job_id must be {JOB_ID_BYTES} bytes")
    if len(client_pub) != X25519_KEY_BYTES:
        raise ChannelAuthError(f"client_pub must be {X25519_KEY_BYTES} bytes")
    if not 0 <= channel_id < 1 << (8 * CHANNEL_ID_BYTES):
        raise ChannelAuthError("channel_id must be a uint128")
    peer = provider_peer_id.encode("utf-8")
    if not 0 < len(peer) <= MAX_PEER_ID_BYTES:
        raise ChannelAuthError(f"provider peer id must be 1..{MAX_PEER_ID_BYTES} bytes")
    # Fixed-width fields, then the one variable field with its length: unambiguous.
    return b"".join(
        (
            JOB_AUTH_TAG,
            job_id,
            client_pub,
            channel_id.to_bytes(CHANNEL_ID_BYTES, "big"),
            bytes([len(peer)]),
            peer,
        )
    )


def sign_job_auth(
    signer: VoucherSigner,
    job_id: bytes,
    client_pub: bytes,
    channel_id: int,
    provider_peer_id: str,
) -> bytes:
    """The 64-byte proof for Open.auth."""
    # sign_hash is plain Ed25519 over the given bytes; the tag keeps purposes apart.
    return signer.sign_hash(job_auth_message(job_id, client_pub, channel_id, provider_peer_id))


def verify_job_auth(
    client_key: bytes,
    auth: bytes | None,
    job_id: bytes,
    client_pub: bytes,
    channel_id: int,
    provider_peer_id: str,
) -> None:
    """Raise ChannelAuthError unless `auth` is the channel client key's proof for this
    job, ephemeral key, channel and provider."""
    if auth is None:
        raise ChannelAuthError("the Open names a channel but carries no proof of its key")
    if len(auth) != JOB_AUTH_BYTES:
        raise ChannelAuthError(f"auth must be {JOB_AUTH_BYTES} bytes, got {len(auth)}")
    if len(client_key) != PUBLIC_KEY_BYTES:
        raise ChannelAuthError(f"channel client key must be {PUBLIC_KEY_BYTES} bytes")
    message = job_auth_message(job_id, client_pub, channel_id, provider_peer_id)
    try:
        nacl.signing.VerifyKey(client_key).verify(message, auth)
    except nacl.exceptions.CryptoError as exc:  # bad signature, or a key off the curve
        raise ChannelAuthError(
            f"auth is not signed by channel {channel_id:#x}'s client key for this job here"
        ) from exc

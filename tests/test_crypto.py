"""End-to-end sealing: X25519 kx + secretstream, zstd above a threshold."""

import pytest
from nacl.public import PrivateKey

from meshnode.core.crypto import (
    MAX_PLAINTEXT_BYTES,
    ZSTD_THRESHOLD,
    Opener,
    Sealer,
    SealError,
    client_session,
    pack_body,
    provider_session,
    unpack_body,
)

AD = b"job-0000-0000-00"


def _pair() -> tuple[Sealer, Opener]:
    provider = PrivateKey.generate()
    client = PrivateKey.generate()
    ck = client_session(client, bytes(provider.public_key))
    pk = provider_session(provider, bytes(client.public_key))
    sealer = Sealer(ck.send, AD)
    return sealer, Opener(pk.recv, sealer.header, AD)


def test_both_directions_agree() -> None:
    provider, client = PrivateKey.generate(), PrivateKey.generate()
    ck = client_session(client, bytes(provider.public_key))
    pk = provider_session(provider, bytes(client.public_key))
    assert ck.send == pk.recv and ck.recv == pk.send and ck.send != ck.recv


def test_round_trip_and_final() -> None:
    sealer, opener = _pair()
    assert opener.open(sealer.seal({"k": "a"})) == ({"k": "a"}, False)
    assert opener.open(sealer.seal({"k": "b"}, final=True)) == ({"k": "b"}, True)
    opener.check_complete()


def test_flipped_ciphertext_byte_detected() -> None:
    sealer, opener = _pair()
    c = bytearray(sealer.seal({"k": "hello"}))
    c[len(c) // 2] ^= 0x01
    with pytest.raises(SealError):
        opener.open(bytes(c))


def test_reordering_detected() -> None:
    sealer, opener = _pair()
    first, second = sealer.seal({"n": 1}), sealer.seal({"n": 2})
    with pytest.raises(SealError):
        opener.open(second)
    del first


def test_replay_detected() -> None:
    sealer, opener = _pair()
    c = sealer.seal({"n": 1})
    opener.open(c)
    with pytest.raises(SealError):
        opener.open(c)


def test_truncation_detected() -> None:
    sealer, opener = _pair()
    opener.open(sealer.seal({"n": 1}))
    with pytest.raises(SealError):
        opener.check_complete()


def test_other_job_ad_rejected() -> None:
    provider, client = PrivateKey.generate(), PrivateKey.generate()
    ck = client_session(client, bytes(provider.public_key))
    pk = provider_session(provider, bytes(client.public_key))
    s = Sealer(ck.send, AD)
    with pytest.raises(SealError):
        Opener(pk.recv, s.header, b"another-job-id!!").open(s.seal({"x": 1}))


def test_wrong_key_rejected() -> None:
    sealer, _ = _pair()
    stranger = Opener(b"\x01" * 32, sealer.header, AD)
    with pytest.raises(SealError):
        stranger.open(sealer.seal({"x": 1}))


def test_large_bodies_are_compressed() -> None:
    small = pack_body({"t": "x" * 10})
    big = pack_body({"t": "x" * (ZSTD_THRESHOLD * 4)})
    assert small[0] == 0 and big[0] == 1 and len(big) < ZSTD_THRESHOLD
    assert unpack_body(big) == {"t": "x" * (ZSTD_THRESHOLD * 4)}


def test_zstd_bomb_refused() -> None:
    import zstandard

    bomb = b"\x01" + zstandard.ZstdCompressor().compress(b"\0" * (MAX_PLAINTEXT_BYTES + 10))
    with pytest.raises(SealError):
        unpack_body(bomb)


def test_unknown_flag_refused() -> None:
    with pytest.raises(SealError):
        unpack_body(b"\x07abc")

"""libp2p peer ids for Ed25519 keys, computed without libp2p.

A libp2p peer id for an Ed25519 key is the *identity* multihash of the protobuf
``PublicKey{Type: Ed25519, Data: key}`` message, printed in base58btc. Keeping this in
core lets adverts be checked (peer id matches the signing key) with no libp2p import.
"""

from __future__ import annotations

ED25519_PUBLIC_KEY_LEN = 32  # fixed by RFC 8032
# protobuf PublicKey: field 1 (KeyType) varint = 1 (Ed25519), field 2 (Data) len = 32.
_PROTOBUF_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, ED25519_PUBLIC_KEY_LEN])
_MULTIHASH_IDENTITY = 0x00  # multicodec "identity": the digest is the input itself
_ENCODED_KEY_LEN = len(_PROTOBUF_ED25519_PREFIX) + ED25519_PUBLIC_KEY_LEN
_PEER_ID_BYTES = bytes([_MULTIHASH_IDENTITY, _ENCODED_KEY_LEN])
# base58 of 38 bytes is at most 52 chars; anything longer is not an Ed25519 peer id and
# parsing it would only waste time on attacker-chosen input.
MAX_PEER_ID_TEXT_LEN = 64

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


class PeerIdError(ValueError):
    """The text or key is not a valid Ed25519 libp2p peer id."""


def _b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\x00"))
    n = int.from_bytes(data, "big")
    out: list[str] = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        digit = _B58_INDEX.get(c)
        if digit is None:
            raise PeerIdError(f"peer id contains a non-base58 character {c!r}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


def peer_id_bytes_from_ed25519(public_key: bytes) -> bytes:
    """Binary peer id (identity multihash) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != ED25519_PUBLIC_KEY_LEN:
        raise PeerIdError(
            f"Ed25519 public key must be {ED25519_PUBLIC_KEY_LEN} bytes, got {len(public_key)}"
        )
    return _PEER_ID_BYTES + _PROTOBUF_ED25519_PREFIX + public_key


def peer_id_from_ed25519(public_key: bytes) -> str:
    """Printable (base58btc) peer id of a raw 32-byte Ed25519 public key."""
    return _b58encode(peer_id_bytes_from_ed25519(public_key))


def ed25519_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a base58btc peer id; ``PeerIdError`` otherwise.

    Only inline (identity-hashed) Ed25519 ids carry their key; sha256-hashed ids (RSA,
    large keys) are rejected because the key cannot be recovered from them.
    """
    if not peer_id or len(peer_id) > MAX_PEER_ID_TEXT_LEN:
        raise PeerIdError(f"peer id length {len(peer_id)} is out of range")
    raw = _b58decode(peer_id)
    header = _PEER_ID_BYTES + _PROTOBUF_ED25519_PREFIX
    if len(raw) != len(header) + ED25519_PUBLIC_KEY_LEN or not raw.startswith(header):
        raise PeerIdError("peer id is not an identity-multihash Ed25519 key")
    return raw[len(header) :]

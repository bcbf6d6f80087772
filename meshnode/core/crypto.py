"""End-to-end sealing of job bodies between a client and a provider's attested job key.

Key agreement: client ephemeral X25519 × provider job X25519 (libsodium `crypto_kx`),
which yields one key per direction. Each direction is an XChaCha20-Poly1305
secretstream: its nonce chaining detects reordering, replay and dropped messages, and
the FINAL tag on the last message detects truncation. The job id is the associated data
of every message, so ciphertext cannot be spliced into another job. Bodies are msgpack
maps, zstd-compressed above a threshold, behind a one-byte flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import zstandard
from nacl import bindings as sodium
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

from meshnode.core.text import shown
from meshnode.core.wire import MalformedFrame, WireError, check_shape

# Below ~512 bytes zstd's frame overhead outweighs the gain on short token chunks.
ZSTD_THRESHOLD = 512
# Decompressed bodies are capped like frames: a 1 MiB zstd bomb must not become 1 GiB.
MAX_PLAINTEXT_BYTES = 1 << 20
ZSTD_LEVEL = 3  # zstd's default: fast enough for per-chunk use, good ratio on text
# Bodies are flat maps of a few scalars (core.messages: prompt, tokens, done); depth 2
# leaves room for a short list. Checked on the bytes before msgpack builds anything, so
# a 57-byte zstd bomb of a million empty lists costs microseconds, not 0.1-0.6 s.
MAX_BODY_DEPTH = 2
MAX_BODY_OBJECTS = 64  # the largest body (done) holds 11 values
# A compressed body's shape is checked on its first bytes before the rest is inflated:
# 64 values' headers fit in far less, so a bomb costs a 4 KiB inflate, not 1 MiB.
BODY_HEAD_BYTES = 4096

_FLAG_RAW = 0
_FLAG_ZSTD = 1
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL


class SealError(WireError):
    """Ciphertext that failed authentication, arrived out of order, or after the end."""

    code = "seal"


class MalformedBody(SealError):
    """An authentic sealed body that is not a small flat map: too large once
    decompressed, not msgpack, too deep or too many values."""

    code = "malformed_body"


@dataclass(frozen=True)
class SessionKeys:
    send: bytes
    recv: bytes


def client_session(client: PrivateKey, provider_pub: bytes) -> SessionKeys:
    rx, tx = sodium.crypto_kx_client_session_keys(
        bytes(client.public_key), bytes(client), provider_pub
    )
    return SessionKeys(send=tx, recv=rx)


def provider_session(provider: PrivateKey, client_pub: bytes) -> SessionKeys:
    try:
        rx, tx = sodium.crypto_kx_server_session_keys(
            bytes(provider.public_key), bytes(provider), client_pub
        )
    except CryptoError as exc:  # a low-order point from a hostile client
        raise SealError("client public key rejected") from exc
    return SessionKeys(send=tx, recv=rx)


def pack_body(body: dict[str, Any]) -> bytes:
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    if len(raw) > MAX_PLAINTEXT_BYTES:
        raise SealError(f"body of {len(raw)} bytes exceeds {MAX_PLAINTEXT_BYTES}")
    if len(raw) >= ZSTD_THRESHOLD:
        return bytes([_FLAG_ZSTD]) + zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    return bytes([_FLAG_RAW]) + raw


def unpack_body(data: bytes, max_plaintext: int = MAX_PLAINTEXT_BYTES) -> dict[str, Any]:
    """The body map inside a sealed message, refused (MalformedBody) when it decompresses
    past `max_plaintext` bytes or is not a small flat map; bounded work either way."""
    if not data:
        raise MalformedBody("empty body")
    flag, payload = data[0], data[1:]
    if flag == _FLAG_ZSTD:
        try:
            dctx = zstandard.ZstdDecompressor()
            # max_output_size only applies when the frame omits its size; bound both ways.
            params = zstandard.get_frame_parameters(payload)
            if params.content_size > max_plaintext:
                raise MalformedBody(f"compressed body announces more than {max_plaintext} "
                                    "bytes")
            with dctx.stream_reader(payload) as reader:
                _check_body_shape(reader.read(BODY_HEAD_BYTES), complete=False)
            raw = dctx.decompress(payload, max_output_size=max_plaintext)
        except zstandard.ZstdError as exc:
            raise MalformedBody(f"bad zstd body: {shown(str(exc))}") from exc
        if len(raw) > max_plaintext:
            raise MalformedBody(f"decompressed body exceeds {max_plaintext} bytes")
    elif flag == _FLAG_RAW:
        raw = payload
        if len(raw) > max_plaintext:
            raise MalformedBody(f"body exceeds {max_plaintext} bytes")
    else:
        raise MalformedBody(f"unknown body flag {flag}")
    _check_body_shape(raw)
    try:
        body = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises assorted types on hostile input
        raise MalformedBody(f"sealed body is not msgpack: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise MalformedBody("sealed body must be a map")
    return body


def _check_body_shape(raw: bytes, *, complete: bool = True) -> None:
    try:
        check_shape(raw, max_depth=MAX_BODY_DEPTH, max_objects=MAX_BODY_OBJECTS,
                    complete=complete)
    except MalformedFrame as exc:
        raise MalformedBody(f"sealed body refused: {exc}") from None


class Sealer:
    """Sending half of one direction."""

    def __init__(self, key: bytes, ad: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, key
        )
        self._ad = ad
        self._closed = False

    def seal(self, body: dict[str, Any], *, final: bool = False) -> bytes:
        if self._closed:
            raise SealError("sealer already sent its final message")
        tag = _TAG_FINAL if final else _TAG_MESSAGE
        self._closed = final
        out: bytes = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, pack_body(body), self._ad, tag
        )
        return out


class Opener:
    """Receiving half of one direction."""

    def __init__(self, key: bytes, header: bytes, ad: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        except (CryptoError, ValueError) as exc:
            raise SealError("bad secretstream header") from exc
        self._ad = ad
        self.finished = False

    def open(
        self, ciphertext: bytes, max_plaintext: int = MAX_PLAINTEXT_BYTES
    ) -> tuple[dict[str, Any], bool]:
        """(body, is_final). Raises SealError on tampering, reordering or replay, and
        MalformedBody on a body past `max_plaintext` bytes (a caller expecting a small
        body, such as a token chunk, passes a tighter bound) or not a small flat map."""
        if self.finished:
            raise SealError("message after the final one")
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, ciphertext, self._ad
            )
        except (CryptoError, ValueError, RuntimeError) as exc:
            raise SealError(
                "ciphertext failed authentication (tampered, reordered or replayed)"
            ) from exc
        self.finished = tag == _TAG_FINAL
        return unpack_body(plain, max_plaintext), self.finished

    def check_complete(self) -> None:
        """Call at end of stream: a missing FINAL message means the peer's output was cut."""
        if not self.finished:
            raise SealError("stream ended before the final sealed message (truncated)")

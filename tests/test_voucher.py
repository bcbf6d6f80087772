"""Vouchers are the payment-channel contract's signed semi-channel states."""

from __future__ import annotations

import nacl.signing
import pytest
from pytoniq_core.boc.builder import Builder

from meshnode.core.voucher import (
    MAX_VOUCHER_BOC_BYTES,
    STATE_TAG,
    BadSignature,
    MalformedVoucher,
    Voucher,
    VoucherError,
    VoucherSigner,
    VoucherState,
    VoucherTooLarge,
    cell_to_boc,
    parse_voucher,
    sign_voucher,
)

CLIENT_SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
CHANNEL_ID = (1 << 127) + 12345  # uses the full uint128 width


def _voucher(seqno: int = 3, sent: int = 1_500_000_000) -> Voucher:
    return VoucherSigner(CLIENT_SEED).sign(VoucherState(CHANNEL_ID, seqno, sent))


def _coins_bits(value: int) -> str:
    """VarUInteger 16 as the TL-B spec defines it: 4-bit byte length, then the bytes."""
    nbytes = (value.bit_length() + 7) // 8
    return format(nbytes, "04b") + (format(value, f"0{nbytes * 8}b") if nbytes else "")


def test_state_bits_follow_the_contract_tlb_layout() -> None:
    state = VoucherState(CHANNEL_ID, 42, 987_654_321)
    expected = (
        format(STATE_TAG, "032b")
        + format(CHANNEL_ID, "0128b")
        + format(42, "064b")
        + _coins_bits(987_654_321)
        + "0"  # conditionals: empty HashmapE
        + "0"  # counterparty_data: nothing
    )
    cell = state.to_cell()
    assert cell.bits.to01() == expected
    assert cell.refs == []


def test_signed_voucher_is_signature_then_state_in_one_cell() -> None:
    voucher = _voucher()
    cell = voucher.to_cell()
    bits = cell.bits.to01()
    assert bits[:512] == "".join(format(b, "08b") for b in voucher.signature)
    assert bits[512:] == voucher.state.to_cell().bits.to01()


def test_signature_is_ed25519_over_the_state_cell_hash() -> None:
    voucher = _voucher()
    verify_key = nacl.signing.SigningKey(CLIENT_SEED).verify_key
    verify_key.verify(bytes(voucher.state.to_cell().hash), voucher.signature)


def test_round_trip_through_boc_preserves_every_field() -> None:
    voucher = _voucher(seqno=9, sent=77)
    parsed = parse_voucher(voucher.to_boc())
    assert parsed == voucher
    assert (parsed.channel_id, parsed.seqno, parsed.sent) == (CHANNEL_ID, 9, 77)


def test_voucher_verifies_under_the_signer_key() -> None:
    signer = VoucherSigner(CLIENT_SEED)
    parse_voucher(_voucher().to_boc()).verify(signer.public_key)


def test_voucher_does_not_verify_under_another_key() -> None:
    other = VoucherSigner(OTHER_SEED).public_key
    with pytest.raises(BadSignature):
        _voucher().verify(other)
    assert not _voucher().is_signed_by(other)


def test_raising_the_amount_breaks_the_signature() -> None:
    voucher = _voucher(sent=100)
    forged = Voucher(VoucherState(CHANNEL_ID, voucher.seqno, 10**12), voucher.signature)
    with pytest.raises(BadSignature):
        forged.verify(VoucherSigner(CLIENT_SEED).public_key)


def test_one_shot_signing_matches_the_reusable_signer() -> None:
    state = VoucherState(CHANNEL_ID, 1, 5)
    assert sign_voucher(state, CLIENT_SEED) == VoucherSigner(CLIENT_SEED).sign(state)


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(VoucherTooLarge):
        parse_voucher(b"\x00" * (MAX_VOUCHER_BOC_BYTES + 1))


def test_garbage_is_a_malformed_voucher() -> None:
    with pytest.raises(MalformedVoucher):
        parse_voucher(b"definitely not a bag of cells")


def _boc_of(builder: Builder) -> bytes:
    return cell_to_boc(builder.end_cell())


def test_wrong_tag_is_malformed() -> None:
    voucher = _voucher()
    builder = Builder().store_bytes(voucher.signature).store_uint(0x696E6974, 32)
    builder.store_uint(CHANNEL_ID, 128).store_uint(1, 64).store_coins(1)
    builder.store_bit(0).store_bit(0)
    with pytest.raises(MalformedVoucher, match="tag"):
        parse_voucher(_boc_of(builder))


def test_counterparty_data_is_refused() -> None:
    voucher = _voucher()
    body = Builder().store_uint(0, 64).store_coins(0).store_bit(0).end_cell()
    raw = Builder().store_bytes(voucher.signature)
    raw.store_uint(STATE_TAG, 32).store_uint(CHANNEL_ID, 128)
    raw.store_uint(voucher.seqno, 64).store_coins(voucher.sent).store_bit(0).store_bit(1)
    raw.store_ref(body)
    with pytest.raises(MalformedVoucher, match="empty"):
        parse_voucher(cell_to_boc(raw.end_cell()))


def test_non_canonical_coins_encoding_is_refused() -> None:
    voucher = _voucher(sent=5)
    raw = Builder().store_bytes(voucher.signature)
    raw.store_uint(STATE_TAG, 32).store_uint(CHANNEL_ID, 128).store_uint(voucher.seqno, 64)
    raw.store_uint(2, 4).store_uint(5, 16)  # 5 padded to two bytes
    raw.store_bit(0).store_bit(0)
    with pytest.raises(MalformedVoucher, match="canonical"):
        parse_voucher(_boc_of(raw))


def test_trailing_bits_are_refused() -> None:
    voucher = _voucher()
    raw = voucher.state.store(Builder().store_bytes(voucher.signature)).store_bit(1)
    with pytest.raises(MalformedVoucher, match="trailing"):
        parse_voucher(_boc_of(raw))


def test_truncated_cell_is_refused() -> None:
    raw = Builder().store_bytes(_voucher().signature).store_uint(STATE_TAG, 32)
    with pytest.raises(MalformedVoucher, match="short"):
        parse_voucher(_boc_of(raw))


@pytest.mark.parametrize(
    ("channel_id", "seqno", "sent"),
    [(-1, 0, 0), (1 << 128, 0, 0), (0, 1 << 64, 0), (0, 0, 1 << 120), (0, 0, -5)],
)
def test_out_of_range_fields_are_refused(channel_id: int, seqno: int, sent: int) -> None:
    with pytest.raises(VoucherError):
        VoucherState(channel_id, seqno, sent)


def test_signer_requires_a_32_byte_seed() -> None:
    with pytest.raises(VoucherError):
        VoucherSigner(b"short")

"""The contract code is accepted only when its hash is the published code hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytoniq_core.boc.builder import Builder

from meshnode.core.voucher import cell_to_boc
from meshnode.pay.contract.code import (
    CODE_FILENAME,
    PAYMENT_CHANNEL_CODE_HASH,
    ContractCodeError,
    code_from_tonweb_source,
    load_payment_channel_code,
)


def _not_the_contract() -> bytes:
    builder = Builder()
    builder.store_uint(0xDEADBEEF, 32)
    return cell_to_boc(builder.end_cell())


def test_missing_cache_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(ContractCodeError, match=r"meshnode\.pay\.contract\.code"):
        load_payment_channel_code(tmp_path)


def test_cached_code_with_another_hash_is_refused(tmp_path: Path) -> None:
    (tmp_path / CODE_FILENAME).write_bytes(_not_the_contract())
    with pytest.raises(ContractCodeError, match=PAYMENT_CHANNEL_CODE_HASH):
        load_payment_channel_code(tmp_path)


def test_cached_garbage_is_refused(tmp_path: Path) -> None:
    (tmp_path / CODE_FILENAME).write_bytes(b"not a boc")
    with pytest.raises(ContractCodeError):
        load_payment_channel_code(tmp_path)


def test_tonweb_source_with_other_code_is_refused() -> None:
    source = f"const PAYMENT_CHANNEL_CODE_HEX = '{_not_the_contract().hex().upper()}';"
    with pytest.raises(ContractCodeError, match="hash"):
        code_from_tonweb_source(source)


def test_tonweb_source_without_the_constant_is_refused() -> None:
    with pytest.raises(ContractCodeError, match="not found"):
        code_from_tonweb_source("module.exports = {}")


def test_cached_code_round_trips_from_tonweb_source(tmp_path: Path) -> None:
    try:
        code = load_payment_channel_code()
    except ContractCodeError as exc:
        pytest.fail(f"{exc} (the set-up step fetches it)")
    source = f"const PAYMENT_CHANNEL_CODE_HEX = '{cell_to_boc(code).hex()}';"
    assert bytes(code_from_tonweb_source(source).hash).hex() == PAYMENT_CHANNEL_CODE_HASH

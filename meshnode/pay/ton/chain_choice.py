"""Which TON chain the CLI's payments run on, and which wallet a node uses there.

``local`` (the default) is ``LocalChain``: the real contract code in an emulator, state
in a file every process on this machine shares. ``liteclient`` is the real network
(``meshnode.pay.ton.lite_chain.LiteChain``: a pytoniq LiteClient on the liteservers of the
``--network-config`` file, paying from the node's wallet-v4r2). It is opt-in only and has
not yet been run against a live network, which ``open`` says in a warning each time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pytoniq_core.boc.address import Address

from meshnode.core.errors import EXIT_USAGE, MeshnodeError
from meshnode.pay.setup.keys import PaymentKeys
from meshnode.pay.ton.chain import Chain
from meshnode.pay.ton.lite_chain import LiteChain, LiteChainError, load_network_config
from meshnode.pay.ton.local_chain import LocalChain, local_wallet_address
from meshnode.pay.ton.wallet_v4 import wallet_v4_address

log = logging.getLogger(__name__)

UNTESTED_NETWORK_WARNING = (
    "--chain liteclient has not been exercised against a live TON network yet: try it "
    "on testnet with small amounts first"
)


class ChainKind(StrEnum):
    LOCAL = "local"
    LITECLIENT = "liteclient"
    NONE = "none"


class ChainUnavailable(MeshnodeError):
    """The chosen chain cannot be used by this build or with these options."""

    exit_code = EXIT_USAGE
    label = "chain unavailable"


@dataclass(frozen=True)
class ChainChoice:
    kind: ChainKind
    network_config: Path | None = None
    """The TON global config (liteservers) for ``liteclient``."""
    state_path: Path | None = None
    """The ``local`` chain's state file (default: ``local_chain.default_state_path``)."""

    def check(self) -> None:
        """Raise ChainUnavailable for a choice that can never work, before any network
        I/O (``liteclient`` reads and checks its config file)."""
        if self.kind is ChainKind.LITECLIENT:
            if self.network_config is None:
                raise ChainUnavailable(
                    "--chain liteclient needs --network-config PATH: the global config "
                    "(liteservers) of the TON network to use; there is no built-in default"
                )
            try:
                load_network_config(self.network_config)
            except LiteChainError as exc:
                raise ChainUnavailable(str(exc)) from None
            return
        if self.kind is ChainKind.NONE:
            raise ChainUnavailable("payments need a chain: use --chain local")
        if self.network_config is not None:
            raise ChainUnavailable("--network-config only applies to --chain liteclient")

    def open(self, keys: PaymentKeys | None = None) -> Chain:
        """The chain; ``liteclient`` needs ``keys`` (its sends are signed by the wallet
        key) and connects on its first call, not here."""
        self.check()
        if self.kind is ChainKind.LITECLIENT:
            if keys is None or self.network_config is None:
                raise ChainUnavailable("--chain liteclient needs this node's wallet key")
            log.warning(UNTESTED_NETWORK_WARNING)
            try:
                return LiteChain(self.network_config, keys.wallet_seed)
            except LiteChainError as exc:
                raise ChainUnavailable(str(exc)) from None
        return LocalChain(self.state_path)

    def wallet(self, keys: PaymentKeys) -> Address:
        """This node's wallet on the chosen chain: on ``local`` a local-chain account, on
        ``liteclient`` the key's real wallet-v4r2 address."""
        self.check()
        if self.kind is ChainKind.LITECLIENT:
            return wallet_v4_address(keys.wallet_public)
        return local_wallet_address(keys.wallet_public)

"""Which TON chain the CLI's payments run on, and which wallet a node uses there.

``local`` (the default) is ``LocalChain``: the real contract code in an emulator, state
in a file every process on this machine shares. ``liteclient`` (the real network through
a pytoniq LiteClient and a network config) is recognised but not built yet: sending
needs a deployed wallet-v4 and waiting for the destination's transaction, and none of
that can be tested without a reachable network, so this build refuses it clearly
rather than ship an adapter nobody has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pytoniq_core.boc.address import Address

from meshnode.pay.chain import Chain
from meshnode.pay.local_chain import LocalChain, local_wallet_address
from meshnode.pay.wallet_keys import PaymentKeys


class ChainKind(StrEnum):
    LOCAL = "local"
    LITECLIENT = "liteclient"
    NONE = "none"


class ChainUnavailable(Exception):
    """The chosen chain cannot be used by this build or with these options."""


@dataclass(frozen=True)
class ChainChoice:
    kind: ChainKind
    network_config: Path | None = None
    """The TON global config (liteservers) for ``liteclient``."""
    state_path: Path | None = None
    """The ``local`` chain's state file (default: ``local_chain.default_state_path``)."""

    def check(self) -> None:
        """Raise ChainUnavailable for a choice that can never work, before any I/O."""
        if self.kind is ChainKind.LITECLIENT:
            where = f" (network config {self.network_config})" if self.network_config else ""
            raise ChainUnavailable(
                f"--chain liteclient is not available in this build{where}: the real-network "
                "adapter is not implemented yet. Use --chain local (an emulated chain running "
                "the real contract code)."
            )
        if self.kind is ChainKind.NONE:
            raise ChainUnavailable("payments need a chain: use --chain local")
        if self.network_config is not None:
            raise ChainUnavailable("--network-config only applies to --chain liteclient")

    def open(self) -> Chain:
        self.check()
        return LocalChain(self.state_path)

    def wallet(self, keys: PaymentKeys) -> Address:
        """This node's wallet on the chosen chain (on ``local``: a local-chain address)."""
        self.check()
        return local_wallet_address(keys.wallet_public)

"""One error base with an exit code: what `meshnode` prints and exits with for each."""

from __future__ import annotations

import pytest
import trio
import typer

from meshnode.cli.common import err, exit_for, run
from meshnode.core.errors import (
    EXIT_FAILURE,
    EXIT_JOB_FAILED,
    EXIT_NO_PROVIDER,
    EXIT_USAGE,
    MeshnodeError,
)
from meshnode.jobs.client import JobError
from meshnode.jobs.routed import NoProvider


def test_errors_the_cli_reports_share_one_base_and_carry_their_exit_code() -> None:
    from meshnode.attest.evidence import EvidenceUnavailableError
    from meshnode.bootstrap_peers import BootstrapListError
    from meshnode.channel_ops import ChannelCommandError
    from meshnode.identity import KeyFileError
    from meshnode.pay.channel.lifecycle import ChannelError
    from meshnode.pay.contract.code import ContractCodeError
    from meshnode.pay.setup.keys import PaymentKeyError
    from meshnode.pay.ton.chain_choice import ChainUnavailable
    from meshnode.pay.ton.emulator import EmulatorError
    from meshnode.pay.ton.local_chain import LocalChainError

    expected = {
        KeyFileError: EXIT_USAGE, PaymentKeyError: EXIT_USAGE, LocalChainError: EXIT_USAGE,
        ContractCodeError: EXIT_USAGE, ChainUnavailable: EXIT_USAGE,
        BootstrapListError: EXIT_USAGE, ChannelError: EXIT_FAILURE,
        EmulatorError: EXIT_FAILURE, ChannelCommandError: EXIT_FAILURE,
        JobError: EXIT_JOB_FAILED, NoProvider: EXIT_NO_PROVIDER,
        EvidenceUnavailableError: EXIT_FAILURE,
    }
    for cls, code in expected.items():
        assert issubclass(cls, MeshnodeError), cls
        assert cls.exit_code == code, cls


def test_an_error_prints_its_label_and_message_as_text_and_exits_with_its_code() -> None:
    peer_text = "[bold red]fake[/] [link=http://x]click[/link]"
    with err.capture() as shown, pytest.raises(typer.Exit) as done:
        exit_for(JobError("internal", peer_text, before_first_token=True))
    assert done.value.exit_code == EXIT_JOB_FAILED
    assert shown.get().strip() == f"job failed: internal: {peer_text}"


def test_run_finds_the_error_inside_a_nursery_and_exits_with_its_code() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            async def fail() -> None:
                raise NoProvider("no provider known for model 'x'")

            nursery.start_soon(fail)

    with err.capture() as shown, pytest.raises(typer.Exit) as done:
        run(body)
    assert done.value.exit_code == EXIT_NO_PROVIDER
    assert "no provider: no provider known for model 'x'" in shown.get()


def test_a_bug_is_not_dressed_up_as_an_error_message() -> None:
    async def body() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(BaseExceptionGroup) as raised:
        run(body)
    assert raised.group_contains(ZeroDivisionError)

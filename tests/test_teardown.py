"""One teardown path: whatever a node's body raises reaches the caller as raised."""

from __future__ import annotations

import pytest
import trio

from meshnode.identity import NodeIdentity
from meshnode.node import client_node
from meshnode.p2p.discovery import BootstrapNode
from meshnode.p2p.host import full_addrs, running_host
from meshnode.tasks import background_tasks


class BodyError(Exception):
    pass


async def test_the_bodys_exception_reaches_the_caller_unwrapped() -> None:
    with pytest.raises(BodyError):
        async with background_tasks() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise BodyError


async def test_background_tasks_end_with_the_body() -> None:
    ended = trio.Event()

    async def task() -> None:
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    async with background_tasks() as nursery:
        nursery.start_soon(task)
    assert ended.is_set()


async def test_a_background_tasks_own_error_is_not_swallowed() -> None:
    async def failing() -> None:
        raise KeyError("task")

    with pytest.RaisesGroup(KeyError):  # type: ignore[attr-defined]
        async with background_tasks() as nursery:
            nursery.start_soon(failing)
            await trio.sleep_forever()


async def test_an_error_inside_a_client_that_joined_the_mesh_reaches_the_caller() -> None:
    async with running_host(NodeIdentity.generate()) as boot_host, trio.open_nursery() as n:
        await n.start(BootstrapNode(boot_host).run)
        with pytest.raises(BodyError):
            async with client_node(bootstrap=(full_addrs(boot_host)[0],)) as client:
                assert client.relay is not None  # the relay client is entered, as in `ask`
                raise BodyError
        n.cancel_scope.cancel()

"""The one teardown path for context managers that run background tasks.

A node yields to its caller from inside nurseries (its own, libp2p's host, the relay
service). Two things go wrong with the obvious shapes:

- cancelling a nursery *before* something entered inside it has exited makes that
  thing's cleanup hit a checkpoint under cancellation: ``Cancelled`` replaces the body's
  exception, and the nursery then absorbs the ``Cancelled``, so the caller sees a clean
  exit (an assertion in a test "passes");
- with strict exception groups each nursery on the way out wraps the body's exception in
  another ``ExceptionGroup``, so the caller cannot catch what the body raised.

``background_tasks`` owns a nursery: when the body ends (normally or not) it cancels the
tasks, waits for them, and lets the body's exception through as raised. Enter whatever
the body uses *before* it, so it closes after the tasks and never under a cancelled
scope. ``node_context`` is ``asynccontextmanager`` for node factories: an exception of
the caller's body that comes back wrapped, alone, in groups is re-raised as itself.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import ParamSpec, TypeVar

import trio

P = ParamSpec("P")
T = TypeVar("T")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _only(group: BaseExceptionGroup[BaseException], raised: BaseException | None) -> bool:
    """Whether ``group`` holds nothing but ``raised`` (at any depth)."""
    leaves = _leaves(group)
    return raised is not None and len(leaves) == 1 and leaves[0] is raised


@asynccontextmanager
async def background_tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery whose tasks live exactly as long as the ``async with`` body.

    The body's own exception propagates unwrapped; an error of a background task still
    propagates (in a group with the body's, if both failed)."""
    raised: BaseException | None = None
    unwrap: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                raised = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if not _only(group, raised):
            raise
        unwrap = raised
    if unwrap is not None:
        # Raised outside the except block, so its __context__/__cause__ stay its own.
        raise unwrap


def node_context(
    factory: Callable[P, AsyncIterator[T]],
) -> Callable[P, AbstractAsyncContextManager[T]]:
    """``asynccontextmanager`` whose caller gets its own body's exception back as raised,
    not wrapped in the exception groups of the nurseries it passed through."""
    inner = asynccontextmanager(factory)

    @functools.wraps(factory)
    @asynccontextmanager
    async def outer(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        raised: BaseException | None = None
        unwrap: BaseException | None = None
        try:
            async with inner(*args, **kwargs) as value:
                try:
                    yield value
                except BaseException as exc:
                    raised = exc
                    raise
        except BaseExceptionGroup as group:
            if not _only(group, raised):
                raise
            unwrap = raised
        if unwrap is not None:
            raise unwrap

    return outer

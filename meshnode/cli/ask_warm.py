"""The warm path of `meshnode ask`: the answer streamed from a running `meshnode client`.

`main` (cli/__init__.py) calls `try_before_typer` before it imports typer: typer 0.29
imports pydantic and builds a TypeAdapter per option, which with typer and rich was most
of a warm ask's start (first byte 0.69 s through typer, 0.35 s without it, medians of 6
on a 2-core box at load 4.5). So this module reads `ask`'s
command line with a stdlib parser of the same options (`parser`; a test keeps the two
in step) and, when the warm path applies, answers without typer. Anything it does not
handle plainly (--help, an error, an option that needs a node of its own, no client)
goes to typer's `ask`, which makes the same choice with `warm_choice` and falls back to
a node of its own. rich is imported only after the last token, for the summary.

Only the standard library, `core.text` and `local_client` load before the first token.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any, NoReturn

from meshnode.cli.local_client import (
    ClientJobError,
    ClientState,
    ClientUnavailable,
    find_client,
    stream_completion,
)
from meshnode.core.text import for_terminal

# ask's options that configure a node of its own: given on the command line, they rule out
# the warm path (the running client has its own peers, bootstrap list and payments).
OWN_NODE_OPTIONS = ("peer", "channel", "bootstrap", "chain", "network_config", "deposit",
                    "budget")

# Why the pre-typer attempt left the warm path, for typer's `ask` to honour and report
# (so it does not try a client that just failed a second time).
declined: str | None = None


class _Unhandled(Exception):
    """The command line is not one the pre-typer parser takes on: typer will."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Unhandled(message)


def parser() -> argparse.ArgumentParser:
    """`ask`'s options as typer defines them in cli/ask.py (names, arity, flags)."""
    p = _Parser(prog="meshnode ask", add_help=False, allow_abbrev=False)
    p.add_argument("prompt")
    p.add_argument("--peer")
    p.add_argument("--model")
    p.add_argument("--bootstrap", action="append")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int)
    p.add_argument("--channel")
    p.add_argument("--chain")
    p.add_argument("--network-config")
    p.add_argument("--deposit")
    p.add_argument("--budget")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--json", dest="json_out", action="store_true")
    p.add_argument("--own-node", action="store_true")
    p.add_argument("--home", type=Path)
    p.add_argument("--verbose", "-v", action="count", default=0)
    return p


def warm_choice(*, model: str | None, insecure: bool, own_node: bool,
                given: Collection[str], home: Path | None) -> ClientState | str:
    """The running client this ask can use, or why it runs a node of its own. ``given``:
    the options set on the command line (environment and defaults do not count)."""
    if declined is not None:
        return declined
    if own_node:
        return "--own-node"
    if model is None:
        return "--peer asks one provider: its own node dials it"
    for name in OWN_NODE_OPTIONS:
        if name in given:
            return f"--{name.replace('_', '-')} configures its own node"
    from meshnode.identity import data_dir

    state = find_client(data_dir(home))
    if isinstance(state, str):
        return state
    if state.insecure != insecure:
        return ("the running client " + ("admits" if state.insecure else "refuses")
                + " providers without a TEE, unlike this ask")
    return state


def note(verbose: int, text: str) -> None:
    """A -v line on stderr, written plainly: rich is not loaded yet on this path."""
    if verbose:
        sys.stderr.write(f"{for_terminal(text)}\n")
        sys.stderr.flush()


def shown_text(value: object) -> str:
    """Text that may come from a provider, made inert for the terminal and for rich's
    markup (a provider's "[red]" or escape sequence is shown, not obeyed)."""
    from rich.markup import escape

    return escape(for_terminal(str(value)))


def stderr_console() -> Any:
    """A rich console on stderr like cli.common's `err`, made when first needed."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def print_summary(text: str, used: list[str], insecure_run: bool, *, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int, cost_nanoton: int,
                  ttft: float, elapsed: float, json_out: bool) -> None:
    """What follows the answer, on both paths: the --json object, or a newline and the
    summary on stderr."""
    if json_out:
        import json

        # As cli.common.print_json writes it: one JSON document on stdout.
        print(json.dumps({
            "text": text, "providers": used, "insecure": insecure_run,
            "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost_nanoton": cost_nanoton, "ttft_s": ttft, "elapsed_s": elapsed,
        }, indent=2, sort_keys=True))
        sys.stdout.flush()
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    err = stderr_console()
    if insecure_run:
        err.print("[yellow]this answer ran WITHOUT a TEE (dev provider): the provider "
                  "could read the prompt[/]")
    err.print(
        f"[dim]{completion_tokens} tokens from {', '.join(used)}, "
        f"first after {ttft * 1000:.0f} ms, {elapsed:.2f} s total, "
        f"finish: {shown_text(finish_reason)}[/]"
    )


def ask_through_client(state: ClientState, model: str, prompt: str, *, max_tokens: int,
                       params: dict[str, Any], json_out: bool, verbose: int) -> int | None:
    """One answer streamed from the running client's API. Returns the exit code, or None
    when the client could not take the job before any output (the caller then runs its
    own node)."""
    global declined
    note(verbose, f"path: running client (pid {state.pid}, {state.url})")

    def on_text(text: str) -> None:
        if json_out:
            return  # the whole text goes out once, unescaped, inside the JSON
        sys.stdout.write(for_terminal(text))
        sys.stdout.flush()

    try:
        answer = stream_completion(state, model, prompt, max_tokens=max_tokens,
                                   params=params, on_text=on_text)
    except ClientUnavailable as exc:
        declined = f"the running client is unavailable: {exc}"
        return None
    except ClientJobError as exc:
        if exc.no_provider:
            stderr_console().print(f"[red]no provider:[/] {shown_text(exc)}")
            return 6
        stderr_console().print(f"\n[red]job failed:[/] {shown_text(exc)}")
        return 4
    if answer.cost_nanoton:
        from meshnode.channel_ops import format_ton

        stderr_console().print(f"[dim]paid {format_ton(answer.cost_nanoton)} by voucher[/]")
    print_summary(answer.text, [answer.provider], answer.insecure,
                  finish_reason=answer.finish_reason, prompt_tokens=answer.prompt_tokens,
                  completion_tokens=answer.completion_tokens,
                  cost_nanoton=answer.cost_nanoton, ttft=answer.ttft_s,
                  elapsed=answer.elapsed_s, json_out=json_out)
    return 0


def exit_now(code: int) -> NoReturn:
    """End the process at once after flushing the output (nothing else to clean up)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def try_before_typer(argv: list[str]) -> None:
    """Answer `ask ARGS` through the running client and exit, if the warm path plainly
    applies; otherwise return, and typer runs `ask` (or whatever `argv` is)."""
    if "--help" in argv:
        return
    p = parser()
    try:
        args = p.parse_args(argv)
    except _Unhandled:
        return  # typer reports the error in its own words
    given = {name for name in OWN_NODE_OPTIONS if getattr(args, name) is not None}
    state = warm_choice(model=args.model, insecure=args.insecure, own_node=args.own_node,
                        given=given, home=args.home)
    if isinstance(state, str):
        return
    assert args.model is not None
    params: dict[str, Any] = {"temperature": args.temperature}
    if args.seed is not None:
        params["seed"] = args.seed
    code = ask_through_client(state, args.model, args.prompt, max_tokens=args.max_tokens,
                              params=params, json_out=args.json_out, verbose=args.verbose)
    if code is not None:
        exit_now(code)

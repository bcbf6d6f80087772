"""`meshnode attest` and `meshnode verify-quote`: this node's evidence, and checking a quote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meshnode.cli.common import HomeOpt, VerboseOpt, err, out, setup_logging
from meshnode.identity import KeyFileError, data_dir, load_or_create


def register(app: typer.Typer) -> None:
    app.command()(attest)
    app.command("verify-quote")(verify_quote)


def attest(home: HomeOpt = None, verbose: VerboseOpt = 0) -> None:
    """Print this node's attestation evidence and the binding of its keys."""
    import time

    from meshnode.attest.local import describe_local_evidence
    from meshnode.core.attest_binding import epoch_at

    setup_logging(verbose)
    try:
        identity, _ = load_or_create(data_dir(home))
    except KeyFileError as exc:
        err.print(f"[red]key file problem:[/] {exc}")
        raise typer.Exit(2) from None
    now = time.time()
    report = describe_local_evidence(identity.job_public, identity.peer_public, now)
    out.print(f"peer public key  {identity.peer_public.hex()}")
    out.print(f"job public key   {identity.job_public.hex()}")
    out.print(f"epoch            {epoch_at(now)}")
    if report.report_data is not None:
        out.print(f"report_data      {report.report_data.hex()}")
    state = "available" if report.available else "unavailable"
    out.print(f"evidence         {report.kind} ({state})")
    out.print(report.detail)
    if report.measurements:
        out.print("\n# paste into the attestation policy to allow this image:")
        out.print(report.policy_snippet(), markup=False)
    raise typer.Exit(0 if report.available else 1)


def verify_quote(
    quote: Annotated[Path, typer.Argument(help="Raw DCAP quote file.")],
    collateral: Annotated[Path, typer.Option("--collateral", help="Collateral JSON.")],
    at: Annotated[
        str | None, typer.Option("--at", help="Verify as of this ISO time (default: now).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Also apply this policy file's rules.")
    ] = None,
) -> None:
    """Verify a TDX/SGX quote with dcap-qvl and print the verified claims."""
    import json
    from datetime import datetime

    from meshnode.attest.local import verify_quote_file
    from meshnode.attest.policy_file import load_policy

    when = None
    if at is not None:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            err.print(f"[red]--at must be an ISO time such as 2025-06-01T12:00:00+00:00[/]: {at}")
            raise typer.Exit(2) from None
        if when.tzinfo is None:
            err.print("[red]--at needs a timezone, e.g. +00:00[/]")
            raise typer.Exit(2)
    try:
        claims = verify_quote_file(
            quote, collateral, when, policy=load_policy(policy) if policy else None
        )
    except FileNotFoundError as exc:
        err.print(f"[red]file not found:[/] {exc.filename}")
        raise typer.Exit(2) from None
    except Exception as exc:  # AttestationError/CollateralError carry their reason
        err.print(f"[red]verification failed:[/] {exc}")
        raise typer.Exit(1) from None
    out.print_json(json.dumps(claims.to_dict()))

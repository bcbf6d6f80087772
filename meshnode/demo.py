"""`meshnode demo`: one provider and one light client on loopback, one streamed answer.

Everything real: a libp2p host per role on 127.0.0.1 (Noise + yamux), the signed advert
fetched and verified, the prompt sealed to the provider's job key, llama.cpp decoding.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console

from meshnode.engine.demo_model import (
    find_demo_model,
    find_demo_model_with_progress_bar,
    format_prompt,
)
from meshnode.identity import NodeIdentity, data_dir
from meshnode.node import client_node, provider_node

# The demo model's context; its answers are short, so 2k leaves ample room.
DEMO_CTX = 2048


async def run_demo(out: Console, err: Console, prompt: str, max_tokens: int, tiny: bool) -> int:
    from meshnode.cli import _load_engine
    from meshnode.engine.llama import steady_logit_bias

    cache = data_dir() / "models"
    model = (
        find_demo_model(Path(tempfile.gettempdir()) / "meshnode-no-demo-pkg", None)
        if tiny
        else find_demo_model_with_progress_bar(cache)
    )
    if tiny and model.is_real:
        from meshnode.engine.demo_model import DemoModel
        from meshnode.engine.tinymodel import tiny_model_path

        model = DemoModel(tiny_model_path(cache), "tiny-llama-random", "plain", False,
                          "--tiny was given")
    if model.is_real:
        out.print(f"[bold]model:[/] {model.name} — a real model (Gemma terms of use)")
    else:
        out.print(f"[bold]model:[/] {model.name} — [yellow]fallback: {model.reason}[/]")
    engine = await _load_engine(model.path, DEMO_CTX, 0)
    params: dict[str, object] = {"temperature": 0.0, "stop": list(model.stop)}
    if not model.is_real:
        params["logit_bias"] = steady_logit_bias(engine)
    try:
        async with provider_node(engine, identity=NodeIdentity.generate()) as prov:
            out.print(f"[bold]provider[/] {prov.peer_id}\n         {prov.addrs[0]}")
            async with client_node(allow_insecure=True) as client:
                advert = await client.connect(prov.addrs[0])
                out.print(
                    f"[bold]client[/]   {client.host.get_id()} fetched and verified the "
                    f"signed advert (model {advert.models[0].id[:12]}…)"
                )
                out.print("[yellow]attestation: dev — no TEE; demo only[/]")
                out.print(f"[bold]>[/] {prompt}")

                async def on_text(text: str) -> None:
                    sys.stdout.write(text)
                    sys.stdout.flush()

                res = await client.ask(
                    advert,
                    format_prompt(model, prompt),
                    max_tokens=max_tokens,
                    params=params,
                    on_text=on_text,
                )
                sys.stdout.write("\n")
                rate = res.usage.completion_tokens / max(res.elapsed_s - res.ttft_s, 1e-9)
                out.print(
                    f"[dim]{res.usage.prompt_tokens} prompt + {res.usage.completion_tokens} "
                    f"completion tokens; first token after {res.ttft_s * 1000:.0f} ms; "
                    f"{rate:.1f} tok/s; finish: {res.usage.finish_reason}; sealed end to end "
                    f"(X25519 + XChaCha20-Poly1305)[/]"
                )
    finally:
        await engine.aclose()
    return 0

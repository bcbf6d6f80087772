"""The node <-> engine-runner protocol: length-prefixed msgpack maps over a socketpair.

Sans-io: ``encode`` turns a message into bytes, ``FrameDecoder`` turns received bytes into
checked messages. The runner is our own child process, but it runs native code that can
crash half-way through a write, so the node still checks every frame: a runner that
sends garbage is treated like one that crashed (killed and restarted), never trusted.

Node -> runner:
  gen    {id, prompt, params, max}   start a generation (params: SamplingParams.to_dict)
  ack    {id, n}                     the node consumed n more chunks of job id (flow control)
  cancel {id}                        stop job id and free its sequence now
  count_req {id, text}               how many prompt tokens text costs
  bias_req  {id}                     the "steady" logit bias (tests and benchmarks)
  ping   {n}                         liveness; answered between two decode steps
  bye    {}                          finish: exit cleanly
Runner -> node:
  progress {stage, frac}             while hashing/loading
  hello  {info, plan, sysinfo, load_s}   the model is loaded and warm
  chunk  {id, text, n}               text of n sampled tokens
  end    {id, reason, prompt, completion, cached}   cached: prompt tokens reused from KV
  err    {id, kind, msg}             kind: invalid | bad_params | too_long | engine
  count  {id, n}                     the answer to count_req; for a gen, sent before its
                                     first chunk (the prompt's tokens)
  bias   {id, bias}                  bias: {token id: value}
  pong   {n}
  fatal  {msg}                       could not load the model; the runner exits
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

# 4-byte big-endian length prefix: a frame is never near 4 GiB, and a fixed prefix is
# one struct call where a varint would be a loop on the per-token path.
LENGTH_BYTES = 4
# Largest frame either side sends: a prompt is at most the job protocol's 1 MiB frame,
# and a bias map of 300 entries or a chunk is far below that. Checked before buffering.
MAX_FRAME_BYTES = 4 * 1024 * 1024
# Longest text a runner error message may carry: it is logged and sent on to clients.
MAX_ERROR_CHARS = 500

_STR, _INT, _FLOAT, _MAP, _BYTES = str, int, (int, float), dict, bytes

SCHEMAS: Mapping[str, Mapping[str, object]] = {
    # node -> runner
    "gen": {"id": _INT, "prompt": _STR, "params": _MAP, "max": _INT},
    "ack": {"id": _INT, "n": _INT},
    "cancel": {"id": _INT},
    "count_req": {"id": _INT, "text": _STR},
    "bias_req": {"id": _INT},
    "ping": {"n": _INT},
    "bye": {},
    # runner -> node
    "progress": {"stage": _STR, "frac": _FLOAT},
    "hello": {"info": _MAP, "plan": _STR, "sysinfo": _STR, "load_s": _FLOAT},
    "chunk": {"id": _INT, "text": _STR, "n": _INT},
    "end": {"id": _INT, "reason": _STR, "prompt": _INT, "completion": _INT, "cached": _INT},
    "err": {"id": _INT, "kind": _STR, "msg": _STR},
    "count": {"id": _INT, "n": _INT},
    "bias": {"id": _INT, "bias": _MAP},
    "pong": {"n": _INT},
    "fatal": {"msg": _STR},
}
ERROR_KINDS = frozenset({"invalid", "bad_params", "too_long", "engine"})
FINISH_REASONS = frozenset({"stop", "length", "cancelled"})


class RunnerProtocolError(ValueError):
    """A frame that is too large, not msgpack, or not one of the messages above."""


def encode(msg: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(dict(msg), use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise RunnerProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return len(body).to_bytes(LENGTH_BYTES, "big") + body


def check(msg: object) -> dict[str, Any]:
    """The message if it matches its schema exactly; RunnerProtocolError otherwise."""
    if not isinstance(msg, dict):
        raise RunnerProtocolError("a frame must hold a map")
    kind = msg.get("t")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise RunnerProtocolError(f"unknown message type {str(kind)[:40]!r}")
    if set(msg) != {"t", *schema}:
        raise RunnerProtocolError(f"{kind}: wrong keys")
    for key, typ in schema.items():
        value = msg[key]
        if isinstance(value, bool) or not isinstance(value, typ):  # type: ignore[arg-type]
            raise RunnerProtocolError(f"{kind}.{key}: wrong type {type(value).__name__}")
    if kind == "err" and msg["kind"] not in ERROR_KINDS:
        raise RunnerProtocolError("err.kind unknown")
    if kind == "end" and msg["reason"] not in FINISH_REASONS:
        raise RunnerProtocolError("end.reason unknown")
    return msg


class FrameDecoder:
    """Accumulates bytes; ``feed`` returns the complete, checked messages so far."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= LENGTH_BYTES:
            size = int.from_bytes(self._buf[:LENGTH_BYTES], "big")
            if size > self._max:
                raise RunnerProtocolError(f"frame of {size} bytes exceeds {self._max}")
            end = LENGTH_BYTES + size
            if len(self._buf) < end:
                break
            body = bytes(self._buf[LENGTH_BYTES:end])
            del self._buf[:end]
            try:
                decoded = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except Exception as exc:  # msgpack raises several unrelated types
                raise RunnerProtocolError(f"not msgpack: {type(exc).__name__}") from None
            out.append(check(decoded))
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Text cut to ``limit`` characters, marked when cut (for errors and logs)."""
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more]"

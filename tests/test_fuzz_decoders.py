"""Short fuzz run (hypothesis) of every decoder a peer or a local HTTP client can reach.

The rule (tests/fuzz_targets.py): any input gives a value or the module's typed error,
with bounded error text, within MAX_INPUT_S. Findings already routed to their owners are
listed in fuzz_targets.KNOWN_BUGS and pinned by test_fuzz_known_bugs.py; these tests
tolerate exactly those signatures and fail on anything new. The long run with 10^6
inputs per target is `python bench/fuzz.py`.
"""

from __future__ import annotations

import random

import pytest
from fuzz_targets import (
    NEEDS_FIXTURES,
    SCRIPT_TARGETS,
    TARGETS,
    Finding,
    Target,
    check,
    fixtures_present,
    generate,
    job_state_machine_target,
    known_signatures,
    mutate_bytes,
    structured_mutant,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Per target and strategy: three strategies give ~210 inputs per target, 15-30 s in all.
EXAMPLES = 70
# Large enough for every seed (a TDX quote is 5 KiB, its collateral 16 KiB) plus edits.
MAX_RAW_BYTES = 4096

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the rule's own MAX_INPUT_S bound applies, measured around the decoder
    derandomize=True,  # same inputs every CI run: a red build is a bug, never luck
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _params() -> list[object]:
    out: list[object] = []
    for name in TARGETS:
        if name in SCRIPT_TARGETS:
            continue  # fuzzed below through its own mutator
        marks = []
        if name in NEEDS_FIXTURES:
            marks.append(pytest.mark.skipif(not fixtures_present(), reason="no TDX fixtures"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _run(target: Target, data: bytes) -> None:
    try:
        check(target, data)
    except Finding as finding:
        if finding.signature not in known_signatures(target.name):
            raise


@pytest.mark.parametrize("name", _params())
def test_random_bytes_decode_to_a_value_or_a_typed_error(name: str) -> None:
    target = TARGETS[name]

    @FUZZ
    @given(st.binary(max_size=MAX_RAW_BYTES))
    def run(data: bytes) -> None:
        _run(target, data)

    run()


@pytest.mark.parametrize("name", _params())
def test_byte_mutants_of_valid_inputs_decode_to_a_value_or_a_typed_error(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()

    @FUZZ
    @given(st.sampled_from(seeds), st.randoms(use_true_random=False))
    def run(seed: bytes, rng: random.Random) -> None:
        _run(target, mutate_bytes(seed, rng))

    run()


@pytest.mark.parametrize("name", _params())
def test_structured_mutants_decode_to_a_value_or_a_typed_error(name: str) -> None:
    """A field replaced, dropped or added; frames reordered; adverts re-signed."""
    target = TARGETS[name]
    seeds = target.seeds()

    @FUZZ
    @given(st.sampled_from(seeds), st.randoms(use_true_random=False))
    def run(seed: bytes, rng: random.Random) -> None:
        _run(target, structured_mutant(target, seed, rng))

    run()


def test_the_mutational_loop_of_bench_fuzz_runs_clean_on_every_target() -> None:
    """The generator bench/fuzz.py uses, 50 inputs per target: it stays in step with the
    targets (a target it cannot mutate fails here, not in an hours-long run)."""
    for name, target in TARGETS.items():
        if name in NEEDS_FIXTURES and not fixtures_present():
            continue
        rng = random.Random(7)
        seeds = target.seeds()
        for _ in range(50):
            _run(target, generate(target, seeds, rng))


# Job scripts for the state machines: ~200 in all, a few seconds.
SCRIPT_EXAMPLES = 150
SCRIPT_BYTE_EXAMPLES = 50


def test_the_job_state_machines_take_any_frame_sequence_with_a_typed_error() -> None:
    """Valid conversations with frames dropped, duplicated, moved, altered, re-sealed
    from any body or taken from the other direction, into ProviderJob and ClientJob with
    the driver's calls in between: only ProtocolError (never LocalProtocolError, the
    driver kept to the documented order), and a machine that raised stays closed."""
    target = job_state_machine_target()
    seeds = target.seeds()

    @settings(FUZZ, max_examples=SCRIPT_EXAMPLES)
    @given(st.sampled_from(seeds), st.randoms(use_true_random=False))
    def run(seed: bytes, rng: random.Random) -> None:
        _run(target, structured_mutant(target, seed, rng))

    @settings(FUZZ, max_examples=SCRIPT_BYTE_EXAMPLES)
    @given(st.sampled_from(seeds), st.randoms(use_true_random=False))
    def run_bytes(seed: bytes, rng: random.Random) -> None:
        _run(target, mutate_bytes(seed, rng))

    for seed in seeds:
        _run(target, seed)
    run()
    run_bytes()

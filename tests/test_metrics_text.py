"""The Prometheus text writer (core.metrics_text), read back by prometheus_client's parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.core.metrics_text import MAX_LABEL_VALUE_CHARS, Family, family, render


def parsed(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_counters_and_gauges_parse_back_to_the_values_written() -> None:
    text = render(
        [
            family("meshnode_jobs_total", "counter", "Jobs.", by="outcome",
                   values={"completed": 3, "started": 4}),
            family("meshnode_decode_tokens_per_second", "gauge", "Speed.", 412.5),
        ],
        {"role": "provider"},
    )
    got = parsed(text)
    assert got["meshnode_jobs_total"] == {
        (("outcome", "completed"), ("role", "provider")): 3.0,
        (("outcome", "started"), ("role", "provider")): 4.0,
    }
    assert got["meshnode_decode_tokens_per_second"] == {(("role", "provider"),): 412.5}


def test_a_label_value_from_a_peer_is_escaped_and_cut() -> None:
    hostile = 'x"} 1\nmeshnode_fake_total 99\\' + "y" * 200
    text = render([family("meshnode_errors_total", "counter", "Errors.", by="reason",
                          values={hostile: 1})])
    got = parsed(text)
    assert set(got) == {"meshnode_errors_total"}  # no sample smuggled in
    (labels,) = got["meshnode_errors_total"]
    assert labels[0][1] == hostile[:MAX_LABEL_VALUE_CHARS]


def test_a_family_with_no_samples_still_parses() -> None:
    text = render([family("meshnode_errors_total", "counter", "Errors.", by="reason", values={})])
    assert [f.name for f in text_string_to_metric_families(text)] == ["meshnode_errors"]


def test_a_counter_must_end_in_total() -> None:
    with pytest.raises(ValueError, match="_total"):
        Family("meshnode_jobs", "counter", "Jobs.")


def test_a_metric_name_outside_the_grammar_is_refused() -> None:
    with pytest.raises(ValueError, match="bad metric name"):
        family("meshnode-jobs", "gauge", "Jobs.", 1)

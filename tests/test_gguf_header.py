"""The GGUF header walker on real files: where the tensor data ends, and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES

from meshnode.core.gguf_header import GgufError, read_layout

SIZES = {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def test_the_tensor_data_of_a_generated_model_ends_where_the_file_ends(
    tiny_gguf_path: Path,
) -> None:
    data = tiny_gguf_path.read_bytes()
    layout = read_layout(data, SIZES, want=("general.name",))
    assert layout.data_end == len(data)
    assert layout.strings == {"general.name": "tiny-llama-random"}
    assert layout.version == 3 and layout.n_tensors > 0


@pytest.mark.parametrize("keep", [10, 100, 2000])
def test_a_header_cut_short_is_an_error_not_an_out_of_bounds_read(
    tiny_gguf_path: Path, keep: int
) -> None:
    with pytest.raises(GgufError, match=r"truncated|cut short"):
        read_layout(tiny_gguf_path.read_bytes()[:keep], SIZES)


def test_a_file_that_is_not_gguf_is_named_as_such() -> None:
    with pytest.raises(GgufError, match="not a GGUF"):
        read_layout(b"PK\x03\x04 a zip file", SIZES)


def test_a_string_length_past_the_end_of_the_file_is_refused() -> None:
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") \
        + (1).to_bytes(8, "little") + (2**62).to_bytes(8, "little")
    with pytest.raises(GgufError, match="past the end"):
        read_layout(header, SIZES)

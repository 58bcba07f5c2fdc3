#!/usr/bin/env python3
"""Writes the dequantization oracle of the kernel tests: random blocks of every quantized type
tp reads, and their values as dequantized by the `gguf` Python package (gguf-py, an
implementation independent of ggml's C code and of ours).

    PYTHONPATH=~/.cache/tp/python python3 tests/data/quants/make_quant_oracle.py

For each type T it writes T.blocks (the raw blocks) and T.f32 (little-endian f32 values).
Block bytes come from a fixed seed; fp16 scale fields are redrawn until finite (subnormals
included) and MXFP4 exponents kept below 251 so that every value is finite in f32. The output
is deterministic; README.md records the gguf version and the sha256 of every file.
"""
import hashlib
import pathlib
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from gguf.constants import GGML_QUANT_SIZES

# type -> byte offsets of its fp16 scale fields inside one block
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "IQ4_NL": [0], "IQ4_XS": [0], "MXFP4": [],
}
ELEMENTS = 2048  # per type: 64 blocks of 32 or 8 super-blocks of 256


def main() -> None:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent)
    rng = np.random.default_rng(20261205)
    lines = []
    for name, fields in F16_FIELDS.items():
        qtype = T[name]
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        nblocks = ELEMENTS // block_elems
        raw = rng.integers(0, 256, size=(nblocks, block_bytes), dtype=np.uint8)
        for off in fields:
            bits = raw[:, off].astype(np.uint16) | (raw[:, off + 1].astype(np.uint16) << 8)
            bits = np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits)
            raw[:, off] = (bits & 0xFF).astype(np.uint8)
            raw[:, off + 1] = (bits >> 8).astype(np.uint8)
        if name == "MXFP4":
            raw[:, 0] = raw[:, 0] % 251
        values = dequantize(raw.reshape(-1), qtype).astype("<f4").reshape(-1)
        assert values.size == ELEMENTS and np.isfinite(values).all(), name
        for suffix, data in ((".blocks", raw.tobytes()), (".f32", values.tobytes())):
            path = out / (name + suffix)
            path.write_bytes(data)
            lines.append(f"{hashlib.sha256(data).hexdigest()}  {path.name}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Safetensors dtype names and how the engine stores and computes them.

Floats are computed in float32. BF16 has no numpy dtype, so its raw storage is viewed as uint16 bit
patterns; F8 types are stored as uint8 and only copied through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # safetensors name, e.g. "BF16"
    itemsize: int
    storage: np.dtype  # numpy dtype of the raw bytes
    kind: str  # "float" (merged), "int" (copied, must match), "f8" (copied from base)
    torch_name: str  # name in config.json / torch


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, np.dtype("<f8"), "float", "float64"),
        DType("F32", 4, np.dtype("<f4"), "float", "float32"),
        DType("F16", 2, np.dtype("<f2"), "float", "float16"),
        DType("BF16", 2, np.dtype("<u2"), "float", "bfloat16"),
        DType("F8_E4M3", 1, np.dtype("u1"), "f8", "float8_e4m3fn"),
        DType("F8_E5M2", 1, np.dtype("u1"), "f8", "float8_e5m2"),
        DType("I64", 8, np.dtype("<i8"), "int", "int64"),
        DType("I32", 4, np.dtype("<i4"), "int", "int32"),
        DType("I16", 2, np.dtype("<i2"), "int", "int16"),
        DType("I8", 1, np.dtype("i1"), "int", "int8"),
        DType("U64", 8, np.dtype("<u8"), "int", "uint64"),
        DType("U32", 4, np.dtype("<u4"), "int", "uint32"),
        DType("U16", 2, np.dtype("<u2"), "int", "uint16"),
        DType("U8", 1, np.dtype("u1"), "int", "uint8"),
        DType("BOOL", 1, np.dtype("u1"), "int", "bool"),
    )
}

# Names accepted for --dtype (torch spelling, short forms and safetensors names).
_ALIASES = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64", "f64": "F64",
}  # fmt: skip

OUTPUT_FLOAT_DTYPES = ("F32", "F16", "BF16")


def parse_output_dtype(text: str) -> str:
    """Map a user's dtype spelling to a safetensors float dtype name (F32, F16, BF16)."""
    name = _ALIASES.get(text.lower(), text.upper())
    if name not in OUTPUT_FLOAT_DTYPES:
        from surgery.errors import RecipeError

        raise RecipeError(
            f"unsupported output dtype {text!r}",
            hint="use one of: float32, float16, bfloat16",
        )
    return name

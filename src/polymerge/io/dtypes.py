"""Mapping between safetensors dtype codes, torch dtypes and recipe spellings."""

from __future__ import annotations

import torch

from polymerge.errors import RecipeError

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """Turn a recipe or CLI dtype spelling into a torch dtype."""
    try:
        if not isinstance(name, str):
            raise KeyError(name)
        return _NAMES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise RecipeError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16") \
            from None


def dtype_name(dtype: torch.dtype) -> str:
    """The spelling transformers uses in config.json (``torch_dtype``)."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize

"""Zero-copy torch tensors over the reservation (torch, but nothing of vLLM)."""

from __future__ import annotations

import torch

from .layout import Layout, ViewSpec


class _CudaRange:
    """Exposes [va, va + nbytes) as a 1-D int16 array through __cuda_array_interface__."""

    def __init__(self, va: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes // 2,), "typestr": "<i2", "data": (va, False), "version": 3, "strides": None,
        }


def flat_tensor(va: int, nbytes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of `dtype` over [va, va + nbytes). Reads of unmapped pages fault on the device."""
    with torch.cuda.device(device):
        t = torch.as_tensor(_CudaRange(va, nbytes), device=device)
    return t.view(dtype)


def view_of(flat: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    es = flat.element_size()
    if spec.offset % es:
        raise ValueError(f"view offset {spec.offset} is not a multiple of the element size {es}")
    return flat.as_strided(spec.shape, spec.strides, spec.offset // es)


def layer_views(va: int, layout: Layout, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (K, V) tensors of shape [rows, row_tokens, kv_heads, head_size], last stride 1."""
    if torch.empty((), dtype=dtype).element_size() != layout.geometry.dtype_bytes:
        raise ValueError(f"dtype {dtype} does not match the layout's {layout.geometry.dtype_bytes}-byte elements")
    flat = flat_tensor(va, layout.total_bytes, dtype, device)
    return [(view_of(flat, layout.view(l, 0)), view_of(flat, layout.view(l, 1)))
            for l in range(layout.geometry.num_layers)]

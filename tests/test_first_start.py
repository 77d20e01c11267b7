"""The first-start note: FA2 kernels in vLLM's wheel carry no sm_90 code, so a Hopper GPU compiles
them from PTX at the first start. The note's claim is checked against the installed wheel itself."""

import os
import struct

import pytest

from vllm_vattention.config import VattnConfig
from vllm_vattention.selection import first_start_note

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def fatbin_entries(path: str) -> set[tuple[str, int]]:
    """(kind, sm) of every entry in the CUDA fat binaries embedded in a shared library: kind "ELF"
    (machine code for that sm) or "PTX" (compiled by the driver at first use on a newer GPU)."""
    data = open(path, "rb").read()
    out, pos = set(), 0
    while (i := data.find(FATBIN_MAGIC, pos)) >= 0:
        version, header_size, size = struct.unpack_from("<HHQ", data, i + 4)
        if version != 1 or header_size != 16:
            pos = i + 4
            continue
        off, end = i + header_size, i + header_size + size
        while off < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
            sm = struct.unpack_from("<I", data, off + 28)[0]
            out.add(({1: "PTX", 2: "ELF"}.get(kind, str(kind)), sm))
            if entry_header == 0:
                break
            off += entry_header + payload
        pos = end
    return out


def flash_attn_library(name: str) -> str:
    import vllm
    path = os.path.join(os.path.dirname(vllm.__file__), "vllm_flash_attn", f"_vllm_{name}_C.abi3.so")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: is vLLM 0.25.0 installed (pip install -e .[test])?")
    return path


def test_the_wheels_fa2_has_no_hopper_code_and_fa3_has():
    fa2 = fatbin_entries(flash_attn_library("fa2"))
    assert ("PTX", 80) in fa2 and ("ELF", 80) in fa2
    assert not any(sm >= 90 for kind, sm in fa2 if kind == "ELF"), fa2  # else the note is wrong: drop it
    fa3 = fatbin_entries(flash_attn_library("fa3"))
    assert ("ELF", 90) in fa3


def test_note_only_for_fa2_decode_on_hopper_or_later():
    fa2, fa3 = VattnConfig.from_env({}), VattnConfig.from_env({"VATTN_DECODE_KERNEL": "fa3"})
    note = first_start_note(fa2, (9, 0))
    assert note and "VATTN_DECODE_KERNEL=fa3" in note and "ComputeCache" in note
    assert first_start_note(fa2, (10, 0))
    assert first_start_note(fa2, (8, 0)) is None  # sm_80 code runs as is
    assert first_start_note(fa3, (9, 0)) is None

"""Write a variant of a GGUF model: new metadata and/or only the first N transformer blocks.

Used to rehearse deployments: a renamed copy is a "good" canary that differs from stable only
in its bytes; a copy truncated to 1-2 blocks is a real, loadable but broken model (like a bad
export) that answers with malformed text - the rollback drill.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf

from llmpipe.io import atomic_path

_BLK = re.compile(r"^blk\.(\d+)\.")


def write_gguf_variant(src: str | Path, dst: str | Path, *, keep_blocks: int | None = None,
                       metadata: dict[str, str] | None = None) -> Path:
    """Copy ``src`` to ``dst`` (atomically) with string ``metadata`` overrides/additions and,
    if ``keep_blocks`` is set, only blocks ``0..keep_blocks-1`` (block_count adjusted)."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    block_key = f"{arch}.block_count"
    metadata = dict(metadata or {})
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            val_type = field.types[0]
            sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
            value: Any = field.contents()
            if field.name == block_key and keep_blocks is not None:
                if not 0 < keep_blocks <= value:
                    raise ValueError(f"{src}: keep_blocks {keep_blocks} outside 1..{value}")
                value = keep_blocks
            if field.name in metadata:
                value, val_type, sub_type = metadata.pop(field.name), gguf.GGUFValueType.STRING, None
            writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
        for key, value in metadata.items():
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
        tensors = [t for t in reader.tensors
                   if keep_blocks is None or not (m := _BLK.match(t.name)) or int(m.group(1)) < keep_blocks]
        for t in tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
    return dst

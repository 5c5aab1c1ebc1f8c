"""Tensor-at-a-time safetensors reading and writing, so a multi-GB checkpoint never sits in memory twice.

Reading parses the header and reads each tensor's bytes with plain file reads (no mmap: mapped pages would
count toward the process's memory as the whole file gets touched). Writing computes the output header up
front from the planned names, dtypes and shapes, then appends each tensor's bytes as it is produced; the
file goes to a temp name and replaces the target atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from library.errors import UserError
from networks.lora_file import atomic_write

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # byte offsets inside the data section (safetensors only)
    end: int = 0


class TensorSource:
    """Tensors of one checkpoint file by name: header info without reading, then one tensor at a time."""

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def raw(self, key: str) -> bytes | bytearray:
        """The tensor's bytes exactly as stored (copied without decoding)."""
        return tensor_bytes(self.get(key))

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path, flag: str) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            size = int.from_bytes(self._file.read(8), "little")
            header = json.loads(self._file.read(size))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = dict(header.pop("__metadata__", None) or {})
            self.infos = {
                k: TensorInfo(DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"])
                for k, v in header.items()
            }
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            self._file.close()
            raise UserError(
                f"{flag}: {path} is not a readable .safetensors file ({type(e).__name__}: {e}); "
                "it is truncated or corrupt: download or save it again"
            ) from None
        self._base = 8 + size

    def raw(self, key: str) -> bytearray:
        info = self.infos[key]
        buf = bytearray(info.end - info.start)
        self._file.seek(self._base + info.start)
        if self._file.readinto(buf) != len(buf):
            raise UserError(
                f"{self.path}: the file ends inside tensor {key}; it is truncated: download it again"
            )
        return buf

    def get(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        buf = self.raw(key)
        if not buf:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()


class CkptSource(TensorSource):
    """A pickled .ckpt, loaded weights-only and memory-mapped where the format allows."""

    def __init__(self, path: Path, flag: str) -> None:
        from library.families.sd_checkpoint import read_state_dict

        self.path = path
        self._sd = read_state_dict(path, flag)
        self.metadata = {}
        self.infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in self._sd.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]


def open_source(path: Path, flag: str) -> TensorSource:
    if not path.is_file():
        raise UserError(f"{flag}: {path} does not exist; check the path")
    if path.suffix.lower() == ".ckpt":
        return CkptSource(path, flag)
    return SafetensorsSource(path, flag)


def tensor_bytes(tensor: torch.Tensor) -> bytes | memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return memoryview(flat.view(torch.uint8).numpy())


def _header(plan: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in plan:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def write_streaming(
    path: str | os.PathLike[str],
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor | bytes | bytearray | memoryview],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `plan`'s tensors in order, each from `produce(name)` (a tensor of the planned dtype and shape, or
    its raw bytes), holding one tensor at a time; atomic (temp file + rename)."""
    header = _header(plan, metadata or {})

    def write(f: BinaryIO) -> None:
        f.write(header)
        for name, dtype, shape in plan:
            data = produce(name)
            if isinstance(data, torch.Tensor):
                if data.dtype != dtype or tuple(data.shape) != tuple(shape):
                    raise ValueError(
                        f"{name}: produced {data.dtype} {tuple(data.shape)}, planned {dtype} {shape}"
                    )
                data = tensor_bytes(data)
            expected = dtype.itemsize * int(torch.Size(shape).numel())
            if len(data) != expected:
                raise ValueError(f"{name}: {len(data)} bytes produced, {expected} planned")
            f.write(data)

    atomic_write(path, write)

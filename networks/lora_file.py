"""Reading and writing LoRA files (kohya layout): safetensors with header metadata, or pickled ckpt/pt.

Writes are atomic: the bytes go to a temporary file in the target directory, which then replaces the
target with `os.replace`, so an interrupted save never leaves a truncated file or destroys the previous one.

safetensors saves also carry the two hashes sd-webui-additional-networks reads (kohya
`train_util.precalculate_safetensors_hashes`): both are computed on a serialization whose header metadata
holds only the `ss_*` keys, because the other keys (modelspec, user titles...) may be edited later:
- `sshs_model_hash`: SHA-256 of everything after the header (the tensor payload);
- `sshs_legacy_hash`: first 8 hex digits of SHA-256 over the 0x10000 bytes at offset 0x100000 of that
  serialization (the A1111 legacy model hash). Files under 1 MiB hash an empty slice, exactly as kohya does.
The tensors are serialized once: the payload does not depend on the metadata, so the final file is the
hashing serialization's payload behind a rebuilt header.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Literal

import torch

from library.errors import UserError, load_error_detail, refused_pickle

ModelFormat = Literal["safetensors", "ckpt", "pt"]
MODEL_FORMATS: tuple[str, ...] = ("safetensors", "ckpt", "pt")
_LEGACY_OFFSET = 0x100000
_LEGACY_SIZE = 0x10000


def _file_mode() -> int:
    """Permissions a plainly created file would get (mkstemp uses 0600, which would surprise users)."""
    umask = 0o022
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    return 0o666 & ~umask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, size_hint: int = 0
) -> None:
    """Call `write` on a temp file next to `path`, fsync it, move it over `path` in one step and fsync the
    directory, so the new name is on disk too. A full disk is a UserError naming the file and about
    `size_hint` bytes needed; the previous file stays. Temp files a crash left behind are removed."""
    from library.training.atomic import disk_full_is_user_error, fsync_path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with disk_full_is_user_error(target, size_hint):
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_temps(target: Path) -> None:
    """`.<name>.<random>.tmp` files of an earlier save of `target` that was killed before its rename."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _split_safetensors(data: bytes) -> tuple[dict, memoryview]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), memoryview(data)[8 + n :]


def _header_bytes(tensor_index: Mapping[str, object], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    header.update({k: v for k, v in tensor_index.items() if k != "__metadata__"})
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # safetensors aligns the payload to 8 bytes by padding the JSON with spaces.
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def safetensors_hashes(serialized: bytes) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of one safetensors serialization."""
    _, payload = _split_safetensors(serialized)
    model_hash = hashlib.sha256(payload).hexdigest()
    legacy = hashlib.sha256(serialized[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_SIZE]).hexdigest()[:8]
    return model_hash, legacy


def _check_metadata(metadata: Mapping[str, str]) -> None:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; not str: {bad[:10]}")


def save_lora_file(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    model_format: ModelFormat = "safetensors",
) -> None:
    """Write `state_dict` atomically. safetensors: `metadata` + sshs hashes in the header; ckpt/pt: no metadata.

    Tensors are written as given (callers cast and move them; see `LoRANetwork.state_dict_for_save`).
    """
    if model_format not in MODEL_FORMATS:
        raise UserError(f"--save_model_as {model_format}: choose one of {', '.join(MODEL_FORMATS)}")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    if model_format != "safetensors":
        atomic_write(path, lambda f: torch.save(tensors, f), size_hint=size)
        return

    import safetensors.torch

    meta = dict(metadata or {})
    _check_metadata(meta)
    training_meta = {k: v for k, v in meta.items() if k.startswith("ss_")}
    # kohya passes the (possibly empty) dict, which writes `"__metadata__":{}`; the legacy hash sees that.
    serialized = safetensors.torch.save(tensors, training_meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(serialized)
    index, payload = _split_safetensors(serialized)
    header = _header_bytes(index, meta)

    def write(f: BinaryIO) -> None:
        f.write(header)
        f.write(payload)

    atomic_write(path, write, size_hint=len(header) + len(payload))


def _where(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Decided by content, not suffix: an 8-byte header length followed by the JSON header's '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_lora_file(
    path: str | os.PathLike[str], *, flag: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict on CPU, header metadata) of a safetensors, ckpt or pt LoRA file.

    `flag` names the option the path came from (e.g. "--network_weights") in error messages.
    """
    file = Path(path)
    where = _where(file, flag)
    if not file.is_file():
        raise UserError(f"{where}: file not found; check the path")
    try:
        if is_safetensors(file):
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 (safe_open is not a dict)
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any parser failure means an unusable file; say which one and why
        if refused := refused_pickle(e):
            raise UserError(
                f"{where}: not a plain weights pickle ({refused}; refused, as it could run code): convert it "
                "to .safetensors with a tool you trust, or get the .safetensors version"
            ) from None
        raise UserError(
            f"{where}: cannot read the file ({type(e).__name__}: {load_error_detail(e)}); "
            "it may be truncated or not a LoRA file: save or download it again"
        ) from e
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise UserError(f"{where}: not a LoRA state dict (expected a flat mapping of names to tensors)")
    return loaded, {}

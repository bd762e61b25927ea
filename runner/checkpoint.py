"""Checkpoints are data, never code: written atomically, verified by a content hash, loaded with
`weights_only=True`. The previous good `last.pt` is kept as `last.prev.pt`, so a file truncated or
corrupted by a crash costs one epoch, never the run.
"""

import hashlib
import io
import os
import warnings
from pathlib import Path

import torch

FORMAT = "robust-train/1"


class CheckpointError(RuntimeError):
    """A file that is missing, truncated, tampered with or not a robust-train checkpoint."""


def _digest(obj, h) -> None:
    """Feed a nested structure of dicts, lists, tensors and scalars into a hash, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _digest(obj[key], h)
        h.update(b"}")
    elif isinstance(obj, list | tuple):
        h.update(b"[")
        for item in obj:
            _digest(item, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def content_hash(state: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "sha256"}, h)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `state` to `path` atomically: temporary file, flush + fsync, rename over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "format": FORMAT}
    state["sha256"] = content_hash(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def load(path: Path, map_location="cpu") -> dict:
    """Load and verify one checkpoint file; raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable robust-train checkpoint (truncated or not a checkpoint): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a torch file but not a robust-train checkpoint")
    if state.get("sha256") != content_hash(state):
        raise CheckpointError(f"{str(path)!r} fails its content hash: the file is corrupted")
    return state


def load_latest(path: Path, map_location="cpu") -> dict | None:
    """`last.pt`, or with a warning its previous good copy when it is corrupted; None when neither exists."""
    path, prev = Path(path), previous_path(Path(path))
    if not path.exists() and not prev.exists():
        return None
    try:
        return load(path, map_location)
    except CheckpointError as err:
        if not prev.exists():
            raise
        warnings.warn(f"{err}; resuming from the previous good checkpoint {prev.name}", stacklevel=2)
        return load(prev, map_location)

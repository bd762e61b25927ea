"""Checkpoints are data, never code: written atomically, verified by a content hash, loaded with
`weights_only=True`. The previous good `last.pt` is kept as `last.prev.pt`, so a file truncated or
corrupted by a crash costs one epoch, never the run.
"""

import hashlib
import io
import os
import shutil
import signal
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
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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


# Test hook (tests/test_resume.py): with ROBUST_TRAIN_TEST_KILL_IN_SAVE=N, the N-th `save(...,
# keep_previous=True)` of this process SIGKILLs itself after the temporary file is complete and before
# the rename: the worst moment for a crash. Unset in normal use; costs one dict lookup per save.
_KILL_IN_SAVE = "ROBUST_TRAIN_TEST_KILL_IN_SAVE"
_saves_with_previous = 0


def _test_kill_hook() -> None:
    global _saves_with_previous
    _saves_with_previous += 1
    if os.environ.get(_KILL_IN_SAVE) == str(_saves_with_previous):
        os.kill(os.getpid(), signal.SIGKILL)


def _keep_previous(path: Path) -> None:
    """Make `last.prev.pt` the current `last.pt` without ever leaving `last.pt` missing: a hard link
    renamed into place (a copy where the file system has no hard links)."""
    prev, staging = previous_path(path), path.with_name(f".{previous_path(path).name}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)
    except OSError:
        shutil.copyfile(path, staging)
    os.replace(staging, prev)


def save(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `state` to `path` atomically: temporary file, flush + fsync, rename over the old one.

    With keep_previous the replaced file stays as `<name>.prev.pt`. At every instant `path` is a
    complete checkpoint (old or new), so a crash anywhere costs at most the state being written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "format": FORMAT}
    state["sha256"] = content_hash(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if keep_previous:
            if path.exists():
                _keep_previous(path)
            _test_kill_hook()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves the old checkpoint, no debris
        raise
    _fsync_dir(path.parent)


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def load(path: Path, map_location="cpu") -> dict:
    """Load and verify one checkpoint file; raises CheckpointError with the reason."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory, not a checkpoint file (.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error below says it all
            warnings.simplefilter("ignore", UserWarning)
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
    """`last.pt`, or with a warning its previous good copy when it is corrupted; None when neither exists.

    A corrupted `last.pt` is moved aside to `last.corrupt.pt`, so the next save cannot make it the
    "previous good" copy.
    """
    path, prev = Path(path), previous_path(Path(path))
    if not path.exists() and not prev.exists():
        return None
    try:
        return load(path, map_location)
    except CheckpointError as err:
        if not prev.exists():
            raise
        state = load(prev, map_location)
        if path.exists():
            os.replace(path, path.with_name(path.stem + ".corrupt" + path.suffix))
        warnings.warn(f"{err}; resuming from the previous good checkpoint {prev.name} "
                      f"(epoch {state.get('epoch')}, step {state.get('step')})", stacklevel=2)
        return state

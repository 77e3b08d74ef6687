"""Tensors on disk in safetensors files: a lazy reader and an atomic, sharded writer.

Reads one `model.safetensors` or shards listed in `model.safetensors.index.json`, one tensor at a
time; writes shards of a bounded size into a temporary directory that is renamed into place at the
end. Knows no PaliGemma names (see `hf.py`). Never unpickles: safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from paligemma_seg.weights.spec import Progress, WeightsError, as_numpy

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
# safetensors dtype codes -> numpy names (the ones a PaliGemma file may plausibly hold).
_DTYPE_NAMES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class TensorSource(Protocol):
    """Named tensors whose shapes and dtypes are known before any is read."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]

    def read(self, name: str) -> np.ndarray: ...


class ArraySource:
    """A TensorSource over an in-memory state dict (numpy, jax or CPU torch tensors)."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self._arrays = state_dict
        self.shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state_dict.items()}

    def read(self, name: str) -> np.ndarray:
        return as_numpy(self._arrays[name])


class PlannedTensor(NamedTuple):
    """One tensor to write: its shape and dtype are known before `make()` builds it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _shard_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> file, from the index if there is one, else from the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise WeightsError(f"{index} is not a safetensors index ({error})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise WeightsError(
                f"{index} lists shard file(s) that do not exist: {', '.join(missing)}"
            )
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise WeightsError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    return {}


class SafetensorsReader:
    """A TensorSource over a directory's safetensors file(s); use as a context manager."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        self._stack = contextlib.ExitStack()
        self._handles: dict[pathlib.Path, Any] = {}
        self._file_of: dict[str, pathlib.Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        files = _shard_files(self.directory)
        if not files:  # one file: every tensor in it
            single = self.directory / SINGLE_FILE
            files = {name: single for name in self._open(single).keys()}
        for name, path in files.items():
            handle = self._open(path)
            if name not in handle.keys():
                raise WeightsError(f"{path} does not hold {name}, which the index says it does")
            view = handle.get_slice(name)
            self._file_of[name] = path
            self.shapes[name] = tuple(view.get_shape())
            self.dtypes[name] = _DTYPE_NAMES.get(view.get_dtype(), view.get_dtype())

    def _open(self, path: pathlib.Path) -> Any:
        if path not in self._handles:
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as error:  # safetensors raises its own error type for bad files
                raise WeightsError(
                    f"cannot read {path}: {error} (truncated or not a safetensors file?)"
                ) from None
            self._handles[path] = self._stack.enter_context(handle)
        return self._handles[path]

    def read(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._file_of[name]].get_tensor(name)
        except Exception as error:
            raise WeightsError(f"cannot read {name} from {self._file_of[name]}: {error}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split in order into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _write_shards(
    directory: pathlib.Path, shards: list[list[PlannedTensor]], progress: Progress
) -> None:
    """Write the shards (and the index when there are several) into `directory`."""
    count = len(shards)
    names = (
        [SINGLE_FILE]
        if count == 1
        else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    )
    weight_map = {}
    for number, (file, shard) in enumerate(zip(names, shards, strict=True), start=1):
        save_file(
            {t.name: t.make() for t in shard}, str(directory / file), metadata={"format": "pt"}
        )
        weight_map.update({t.name: file for t in shard})
        if progress:
            progress(
                f"wrote {file} ({number}/{count}, {sum(t.nbytes for t in shard) / 2**30:.2f} GiB)"
            )
    if count > 1:
        total = sum(t.nbytes for shard in shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_directory(
    directory: str | os.PathLike,
    tensors: list[PlannedTensor],
    files: Mapping[str, Any],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: Progress = None,
) -> pathlib.Path:
    """Write tensors (sharded if big) and `files` into a temporary directory, then rename it.

    `files` maps a name to its content: bytes are written as they are, a path (os.PathLike) is
    copied, anything else is written as JSON. An interrupted write leaves no partial `directory`.
    An existing `directory` is an error unless `overwrite`, in which case it is replaced only after
    the new one is complete.
    """
    target = pathlib.Path(directory)
    if target.exists() and not overwrite:
        raise WeightsError(f"{target} already exists; remove it or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_shards(staging, plan_shards(tensors, max_shard_bytes), progress)
        for name, content in files.items():
            _write_file(staging / name, content)
        staging.chmod(0o755)  # mkdtemp makes it private
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_file(path: pathlib.Path, content: Any) -> None:
    """bytes verbatim, a path copied, anything else as JSON."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, os.PathLike):
        shutil.copyfile(content, path)
    else:
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _replace_directory(new: pathlib.Path, target: pathlib.Path) -> None:
    """Rename `new` to `target`; an old `target` is moved aside first and removed after."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)

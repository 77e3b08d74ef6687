"""big_vision `.npz` checkpoints: flat `/`-joined keys (optionally under `params/`), stacked layers.

Reads headers first (keys, shapes, dtypes checked before any data is read), then one array at a
time; bfloat16 arrives from numpy as 2-byte void and is viewed back as bfloat16. Writes the same
format through a temporary file that is renamed into place. Never unpickles (`allow_pickle=False`).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from paligemma_seg.weights.spec import (
    Index,
    LeafSource,
    LoadInfo,
    ModelShapes,
    Progress,
    WeightsError,
    as_numpy,
    block,
    check_dtypes,
    check_keys,
    check_shapes,
    dtype_name,
    flatten,
    numpy_dtype,
    unflatten,
)

PARAMS_PREFIX = "params/"
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


class NpzEntry(NamedTuple):
    """One array of an .npz as its header describes it."""

    member: str  # name inside the zip
    shape: tuple[int, ...]
    dtype: np.dtype  # bfloat16 already recovered from void


def _stored_dtype(dtype: np.dtype) -> np.dtype:
    """numpy writes bfloat16 as 2-byte void; read it back as bfloat16."""
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
        return np.dtype(ml_dtypes.bfloat16)
    return dtype


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of the .npy stream at `f`, which is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _header(zf: zipfile.ZipFile, member: str, path: pathlib.Path) -> NpzEntry:
    """Shape and dtype of one member, from its .npy header only."""
    with zf.open(member) as f:
        shape, _, dtype = _read_npy_header(f)
    if dtype.hasobject:
        raise WeightsError(
            f"{path}: array {member!r} holds Python objects and could only be read by unpickling, "
            "which is refused (allow_pickle=False). Re-save the checkpoint with numeric arrays."
        )
    return NpzEntry(member, tuple(shape), _stored_dtype(dtype))


def _key(member: str) -> str:
    """Zip member -> tree key: drop `.npy` and a leading `params/`."""
    key = member.removesuffix(".npy")
    return key.removeprefix(PARAMS_PREFIX)


def _open(path: str | os.PathLike) -> tuple[pathlib.Path, zipfile.ZipFile]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"no such checkpoint file: {path}")
    try:
        return path, zipfile.ZipFile(path)
    except _READ_ERRORS as error:
        raise WeightsError(
            f"cannot read {path}: {error} (truncated, or not an .npz file?)"
        ) from None


def read_npz_headers(path: str | os.PathLike) -> dict[str, NpzEntry]:
    """Tree key -> NpzEntry for every array, reading no array data."""
    path, zf = _open(path)
    with zf:
        entries = {}
        for member in zf.namelist():
            key = _key(member)
            if key in entries:
                raise WeightsError(
                    f"{path}: {key} is stored twice (with and without {PARAMS_PREFIX})"
                )
            try:
                entries[key] = _header(zf, member, path)
            except _READ_ERRORS as error:
                raise WeightsError(
                    f"cannot read {member!r} in {path}: {error} (corrupt file?)"
                ) from None
    return entries


def check_npz(path: str | os.PathLike) -> tuple[dict[str, NpzEntry], ModelShapes]:
    """Headers plus the checks on keys, dtypes and shapes; returns (entries, model sizes)."""
    entries = read_npz_headers(path)
    source = str(path)
    check_keys(entries, source)
    check_dtypes({k: e.dtype for k, e in entries.items()}, source)
    shapes = check_shapes({k: e.shape for k, e in entries.items()}, source)
    return entries, shapes


def _read_array(zf: zipfile.ZipFile, entry: NpzEntry, path: pathlib.Path) -> np.ndarray:
    try:
        with zf.open(entry.member) as f:
            array = np.lib.format.read_array(f, allow_pickle=False)
    except _READ_ERRORS as error:
        raise WeightsError(
            f"cannot read {entry.member!r} in {path}: {error} (truncated?)"
        ) from None
    return array.view(entry.dtype) if array.dtype != entry.dtype else array


def load_npz(
    path: str | os.PathLike, *, dtype: str | None = None, progress: Progress = None
) -> tuple[dict[str, Any], LoadInfo]:
    """A big_vision .npz -> (nested tree of numpy arrays, LoadInfo); `dtype` casts on the way."""
    entries, _ = check_npz(path)
    target = numpy_dtype(dtype) if dtype else None
    path, zf = _open(path)
    flat = {}
    with zf:
        for number, (key, entry) in enumerate(sorted(entries.items()), start=1):
            array = _read_array(zf, entry, path)
            flat[key] = array.astype(target) if target and array.dtype != target else array
            if progress:
                progress(
                    f"read {number}/{len(entries)} {key} {entry.shape} {dtype_name(entry.dtype)}"
                )
    prefixed = any(e.member.startswith(PARAMS_PREFIX) for e in entries.values())
    info = LoadInfo(
        source=str(path),
        format="npz",
        key_style=PARAMS_PREFIX + "*" if prefixed else "img/*, llm/*",
        dtypes=tuple(sorted({dtype_name(e.dtype) for e in entries.values()})),
        notes=(f"dropped the {PARAMS_PREFIX} prefix",) if prefixed else (),
    )
    return unflatten(flat), info


def _data_offset(path: pathlib.Path, info: zipfile.ZipInfo) -> tuple[int, bool]:
    """(file offset of a stored member's .npy array data, Fortran order)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise WeightsError(f"{path}: bad local header for {info.filename!r} (corrupt file?)")
        name_length = int.from_bytes(local[26:28], "little")
        extra_length = int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_length + extra_length)
        _, fortran_order, _ = _read_npy_header(f)
        return f.tell(), fortran_order


def leaf_sources(path: str | os.PathLike) -> tuple[dict[str, LeafSource], ModelShapes]:
    """Checked headers -> key -> LeafSource, and the model sizes; no array data is read yet.

    Members stored uncompressed (np.savez, big_vision's releases) are memory-mapped, so a block
    reads only its own bytes; compressed members (np.savez_compressed) are read whole per call.
    """
    entries, shapes = check_npz(path)
    path, zf = _open(path)
    with zf:
        infos = {info.filename: info for info in zf.infolist()}

    def reader(entry: NpzEntry) -> LeafSource:
        info = infos[entry.member]
        if info.compress_type == zipfile.ZIP_STORED:
            offset, fortran = _data_offset(path, info)
            order = "F" if fortran else "C"

            def read(index: Index | None) -> np.ndarray:
                mapped = np.memmap(path, entry.dtype, "r", offset, entry.shape, order)
                return np.array(block(mapped, index))

        else:

            def read(index: Index | None) -> np.ndarray:
                with zipfile.ZipFile(path) as archive:
                    return np.array(block(_read_array(archive, entry, path), index))

        return LeafSource(entry.shape, entry.dtype, read)

    return {key: reader(entry) for key, entry in entries.items()}, shapes


def save_npz(
    params: Mapping[str, Any], path: str | os.PathLike, *, progress: Progress = None
) -> pathlib.Path:
    """Write the tree as a big_vision .npz (flat `/` keys, no prefix), atomically.

    Arrays are written one at a time (a device array is copied to the host only while it is
    written; a leaf may also be a function returning its array, called when it is written, in
    sorted key order); bfloat16 is stored the way numpy stores it (2-byte void), as big_vision does.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for number, (key, value) in enumerate(sorted(flat.items()), start=1):
                array = as_numpy(value() if callable(value) else value)
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
                if progress:
                    progress(f"wrote {number}/{len(flat)} {key} {array.shape} {array.dtype}")
        os.chmod(temporary, 0o644)  # mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    return path

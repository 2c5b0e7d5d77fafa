"""Stream the tensors of a checkpoint directory in and out, one piece at a time.

Hand-written because safetensors reads and writes whole tensors (``save_file`` holds a shard in memory).

Weight files of a 7B model are tens of GB; the tools that rewrite them (``weights apply-delta``,
``make-delta``, ``convert``, ``merge-lora``) never hold a whole model:

- :class:`CheckpointReader` lists the tensors of a directory (``model.safetensors``,
  ``model.safetensors.index.json`` + shards, ``pytorch_model.bin``, ``pytorch_model.bin.index.json``
  + shards) from the headers alone, and reads any range of a tensor's elements. Safetensors are
  read with plain positioned reads (no memory map, so the pages read do not stay resident);
  ``.bin`` files are opened with ``torch.load(weights_only=True, mmap=True)`` (a pickle can run
  code; ``weights_only`` refuses anything but tensors), which gives each tensor's place in the
  file, and are then read the same way; a legacy (non-zip) ``.bin`` is loaded whole, and its
  tensors are dropped once the last of them has been read.
- :class:`ShardedWriter` writes sharded safetensors plus ``model.safetensors.index.json`` from a
  plan of names, shapes and dtypes known up front, split into shards by huggingface_hub: each
  shard's header is written first and the tensor bytes are appended as they are produced, so no
  shard is ever assembled in memory. :func:`write_tensors` drives it; it is the one checkpoint
  writer (``save_checkpoint`` writes through it too).
- :func:`copy_aux_files` copies what is not a weight (config, tokenizer, processor, template).

Peak memory is a few chunks (``chunk_bytes``, 16 MiB by default), whatever the size of the
tensors or of the shards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = [
    "WriteOptions",
    "WriteResult",
    "TensorSpec",
    "TensorInfo",
    "CheckpointReader",
    "ShardedWriter",
    "OutTensor",
    "write_tensors",
    "copy_aux_files",
    "parse_size",
    "element_size",
    "WEIGHT_SUFFIXES",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_SHARD_BYTES",
]

DEFAULT_CHUNK_BYTES = 16 * 1024**2
DEFAULT_SHARD_BYTES = 2 * 1024**3

# Files that hold weights (or index them); everything else in a checkpoint directory is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".index.json")


def _dtype_tables() -> tuple[dict[str, Any], dict[Any, str]]:
    import torch

    pairs = [("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16),
             ("BF16", torch.bfloat16), ("I64", torch.int64), ("I32", torch.int32),
             ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8), ("BOOL", torch.bool)]
    for st, name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
        if hasattr(torch, name):
            pairs.append((st, getattr(torch, name)))
    return dict(pairs), {t: s for s, t in pairs}


def element_size(dtype: Any) -> int:
    """Bytes per element of a torch dtype."""
    import torch

    return torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """``"500MB"``, ``"2GB"``, ``"1.5GiB"`` or a number of bytes → bytes.

    Raises:
        ModelError: not a size.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
             "K": 1024, "M": 1024**2, "G": 1024**3, "B": 1}
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            num, mult = s[: -len(unit)], units[unit]
            break
    else:
        num, mult = s, 1
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise ModelError(f"'{text}' is not a size", "write it like 500MB or 2GB") from None
    if value <= 0:
        raise ModelError(f"'{text}' is not a positive size", "write it like 500MB or 2GB")
    return value


@dataclass(kw_only=True)
class WriteOptions:
    """The output options of every tool that writes a checkpoint (convert, merge-lora, the deltas).

    Attributes:
        out: output directory (written atomically: nothing is there until it is complete).
        overwrite: replace an existing ``out``.
        max_shard_bytes: output shard size.
        chunk_bytes: bytes read per piece (bounds the memory use).
    """

    out: Path
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


@dataclass(kw_only=True)
class WriteResult:
    """What every tool that writes a checkpoint reports about its output.

    Attributes:
        out: the output directory.
        tensors: tensors written.
        bytes: bytes of tensor data written.
        shards: safetensors files written.
        seconds: wall time.
    """

    out: str
    tensors: int = 0
    bytes: int = 0
    shards: int = 0
    seconds: float = 0.0

    def record(self, written: dict[str, Any]) -> None:
        """Take the counts from what :func:`write_tensors` returned."""
        self.tensors, self.bytes, self.shards = len(written["weight_map"]), written["total_size"], len(written["files"])


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor is: name, shape and dtype.

    Attributes:
        name: its key in the checkpoint.
        shape: its shape.
        dtype: its torch dtype.
    """

    name: str
    shape: tuple[int, ...]
    dtype: Any

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        return self.numel * element_size(self.dtype)


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A :class:`TensorSpec` and where its data lies.

    Attributes:
        file: the weight file holding it.
        offset: byte offset of its data in a safetensors file (``None`` for ``.bin``).
    """

    file: Path = Path()
    offset: int | None = None


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: truncated safetensors file (no header)",
                                 "the file is incomplete; download or write it again")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100 * 1024**2:
                raise ModelError(f"{path}: not a safetensors file (header length {n})")
            raw = fh.read(n)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) < n:
        raise ModelError(f"{path}: truncated safetensors header", "the file is incomplete")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


class CheckpointReader:
    """Read the tensors of a checkpoint directory (safetensors or ``.bin`` shards) piece by piece.

    Args:
        path: the checkpoint directory (or one weight file).
        what: how to name this input in error messages ("--base", "--delta", ...).

    Attributes:
        tensors: name → :class:`TensorInfo`, in file order, then the order within each file.
        format: ``"safetensors"`` or ``"bin"``.
        notes: remarks for the user (e.g. a legacy ``.bin`` that had to be loaded whole).

    Raises:
        ModelError: no weights, a broken index, an unreadable file, or a non-tensor entry.
    """

    def __init__(self, path: str | os.PathLike, what: str = "checkpoint"):
        self.path = Path(path)
        self.what = what
        self.notes: list[str] = []
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._bins: dict[Path, dict[str, Any]] = {}
        self._pending: dict[Path, set[str]] = {}
        self._index_map: dict[str, Path] | None = None
        files, self.format = self._weight_files()
        for f in files:
            if self.format == "safetensors":
                self._scan_safetensors(f)
            else:
                self._scan_bin(f)
        for name, info in self.tensors.items():
            self._pending.setdefault(info.file, set()).add(name)

    # ---------------------------------------------------------------- discovery
    def _weight_files(self) -> tuple[list[Path], str]:
        p = self.path
        if p.is_file():
            return [p], "safetensors" if p.suffix == ".safetensors" else "bin"
        if not p.is_dir():
            raise ModelError(f"{self.what} {p}: directory not found", "check the path")
        for index_name, fmt in (("model.safetensors.index.json", "safetensors"),
                                ("pytorch_model.bin.index.json", "bin")):
            index = p / index_name
            if index.exists():
                return self._files_from_index(index), fmt
        if (p / "model.safetensors").exists():
            return [p / "model.safetensors"], "safetensors"
        if (p / "pytorch_model.bin").exists():
            return [p / "pytorch_model.bin"], "bin"
        st = sorted(p.glob("*.safetensors"))
        if st:
            return st, "safetensors"
        bins = sorted(p.glob("*.bin"))
        if bins:
            return bins, "bin"
        raise ModelError(f"{self.what} {p}: no weight files (*.safetensors, *.bin)",
                         "point it at a checkpoint directory")

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{index}: not a readable JSON index ({exc})") from None
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ModelError(f"{index}: no 'weight_map' in the index", "the index file is broken")
        self._index_map = {k: index.parent / v for k, v in wmap.items()}
        files = list(dict.fromkeys(self._index_map.values()))
        for f in files:
            if not f.exists():
                names = [k for k, v in self._index_map.items() if v == f]
                raise ModelError(f"{index}: shard {f.name} (holding {names[0]}"
                                 f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}) is missing",
                                 "the download is incomplete; fetch the missing shard")
        return files

    def _check_index_entry(self, name: str, file: Path) -> None:
        imap = self._index_map
        if imap is not None and imap.get(name) not in (None, file):
            raise ModelError(f"{file}: tensor {name} is here but the index puts it in {imap[name].name}",
                             "the index does not match the shards")

    def _add(self, info: TensorInfo) -> None:
        if info.name in self.tensors:
            raise ModelError(f"{info.file}: tensor {info.name} also appears in "
                             f"{self.tensors[info.name].file.name}", "the shards overlap")
        self._check_index_entry(info.name, info.file)
        self.tensors[info.name] = info

    def _scan_safetensors(self, path: Path) -> None:
        by_name, _ = _dtype_tables()
        header, data_start = _read_safetensors_header(path)
        size = path.stat().st_size
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        entries.sort(key=lambda kv: (kv[1].get("data_offsets") or [0])[0] if isinstance(kv[1], dict) else 0)
        for name, meta in entries:
            try:
                dtype = by_name[meta["dtype"]]
                shape = tuple(int(d) for d in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"{path}: tensor {name}: unreadable entry in the header "
                                 f"({json.dumps(meta)[:80]})") from None
            info = TensorInfo(name, shape, dtype, path, data_start + begin)
            if end - begin != info.nbytes or data_start + end > size:
                raise ModelError(f"{path}: tensor {name}: its data ({end - begin} bytes at {begin}) does "
                                 f"not fit its shape {list(shape)} {meta['dtype']} or the file",
                                 "the file is truncated or corrupt")
            self._add(info)
        imap = self._index_map
        if imap is not None:
            for name, f in imap.items():
                if f == path and name not in self.tensors:
                    raise ModelError(f"{path}: the index lists tensor {name} in this shard but it is not there",
                                     "the index does not match the shards")

    def _load_bin(self, path: Path) -> dict[str, Any]:
        import pickle

        import torch

        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                # Legacy (pre-zip) torch.save format cannot be memory-mapped: load it whole.
                sd = torch.load(path, map_location="cpu", weights_only=True)
                self.notes.append(f"{path.name}: legacy .bin format, loaded whole (no mmap)")
        except pickle.UnpicklingError as exc:
            raise ModelError(f"{path}: refused to load: it holds more than tensors "
                             f"({str(exc).splitlines()[0][:120]})",
                             "only plain state dicts load safely; convert it with the tool that made it") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ModelError(f"{path}: cannot load ({str(exc).splitlines()[0][:160]})",
                             "the file is truncated or not a PyTorch state dict") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ModelError(f"{path}: not a state dict (a {type(sd).__name__})")
        return sd

    @staticmethod
    def _zip_record_offsets(path: Path) -> set[int] | None:
        """File offsets of the data records of a (zip-format) ``torch.save`` file."""
        import struct
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
                offsets = set()
                for info in zf.infolist():
                    if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                        continue
                    fh.seek(info.header_offset)
                    head = fh.read(30)
                    n, m = struct.unpack("<HH", head[26:30])
                    offsets.add(info.header_offset + 30 + n + m)
                return offsets
        except (zipfile.BadZipFile, OSError, struct.error):
            return None

    def _scan_bin(self, path: Path) -> None:
        import torch

        sd = self._load_bin(path)
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise ModelError(f"{path}: entry {name} is a {type(t).__name__}, not a tensor",
                                 "only plain state dicts are supported")
        # torch.load(mmap=True) maps the whole file and each storage is a view at its zip record,
        # so a tensor's file offset is its address minus the mapping's base. With offsets the
        # tensors are read like safetensors (positioned reads that do not stay resident); without
        # (legacy format, odd strides) they are read through the mapping.
        offsets = self._zip_record_offsets(path)
        ptrs = sorted({t.untyped_storage().data_ptr() for t in sd.values() if t.numel()})
        base = None
        if offsets and ptrs and len(ptrs) <= len(offsets):
            cand = ptrs[0] - min(offsets)
            if all(p - cand in offsets for p in ptrs):
                base = cand
        fallback = False
        for name, t in sd.items():
            offset = None
            if base is not None and t.is_contiguous() and t.numel():
                offset = t.data_ptr() - base
            fallback |= offset is None and t.numel() > 0
            self._add(TensorInfo(name, tuple(t.shape), t.dtype, path, offset))
        if fallback:
            self._bins[path] = sd
        imap = self._index_map
        if imap is not None:
            for name, f in imap.items():
                if f == path and name not in sd:
                    raise ModelError(f"{path}: the index lists tensor {name} in this shard but it is not there",
                                     "the index does not match the shards")

    # ---------------------------------------------------------------- reading
    def read(self, name: str, start: int = 0, stop: int | None = None) -> Any:
        """Elements ``[start, stop)`` of a tensor, flattened (row-major), as a new 1-D tensor."""
        import torch

        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        esize = element_size(info.dtype)
        n = (stop - start) * esize
        if n == 0:
            return torch.empty(0, dtype=info.dtype)
        if info.offset is None:
            sd = self._bins.get(info.file)
            if sd is None:
                sd = self._bins[info.file] = self._load_bin(info.file)
            return sd[name].reshape(-1)[start:stop].clone()
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buf = bytearray(n)
        view = memoryview(buf)
        pos, off = 0, info.offset + start * esize
        while pos < n:
            got = os.preadv(fd, [view[pos:]], off + pos)
            if got <= 0:
                raise ModelError(f"{info.file}: tensor {name}: file ended early", "the file is truncated")
            pos += got
        return torch.frombuffer(buf, dtype=info.dtype)

    def chunks(self, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, start: int = 0,
               stop: int | None = None) -> Iterator[Any]:
        """Yield a tensor's elements ``[start, stop)`` in flat pieces of about ``chunk_bytes``."""
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        step = max(1, chunk_bytes // element_size(info.dtype))
        for s in range(start, stop, step):
            yield self.read(name, s, min(stop, s + step))

    def read_tensor(self, name: str) -> Any:
        """A whole tensor, in its shape (for small tensors)."""
        info = self.tensors[name]
        return self.read(name).reshape(info.shape)

    def release(self, name: str) -> None:
        """Say that ``name`` will not be read again; a ``.bin`` file is unmapped after its last tensor."""
        info = self.tensors.get(name)
        if info is None:
            return
        pending = self._pending.get(info.file)
        if pending is not None:
            pending.discard(name)
            if not pending and info.file in self._bins:
                del self._bins[info.file]

    def close(self) -> None:
        """Close files and drop mappings."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bins.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class OutTensor:
    """One tensor to write: its name, shape, dtype and a producer of its flat pieces in order.

    Attributes:
        name: key in the output.
        shape: its shape.
        dtype: its torch dtype.
        produce: called once when the tensor is written; yields 1-D tensors whose concatenation is
            the tensor, flattened row-major.
        done: called after the tensor is written (e.g. to release the inputs).
    """

    name: str
    shape: tuple[int, ...]
    dtype: Any
    produce: Callable[[], Iterable[Any]]
    done: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        n = element_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


class ShardedWriter:
    """Write tensors into sharded safetensors files, each tensor's bytes straight to disk.

    The split into shards is huggingface_hub's (``split_state_dict_into_shards_factory``, behind the
    split ``save_pretrained`` uses: file names ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``,
    a tensor larger than the limit in a shard of its own). The writing is ours because safetensors'
    ``save_file`` needs every tensor of a shard whole in memory, and the streaming tools produce a
    tensor piece by piece: each shard's header is written first, then its tensors' bytes as they come.
    Tensors must be written in :attr:`order` (the shards' order, which may differ from the plan's).

    Args:
        out_dir: the directory (normally the temporary directory of :func:`llavamed_core.io.atomic_dir`).
        plan: ``(name, shape, dtype)`` of every tensor.
        max_shard_bytes: the shard size limit.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], Any]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        from huggingface_hub import split_state_dict_into_shards_factory

        _, to_name = _dtype_tables()
        self.out_dir = Path(out_dir)
        specs: dict[str, tuple[tuple[int, ...], Any, int]] = {}
        for name, shape, dtype in plan:
            if dtype not in to_name:
                raise ModelError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
            if name in specs:
                raise ModelError(f"tensor {name}: planned twice")
            specs[name] = (tuple(shape), dtype, TensorSpec(name, tuple(shape), dtype).nbytes)
        if not specs:
            raise ModelError("no tensors to write")
        # Sizes, not tensors: the torch flavour of the split imports torch.distributed (~40 MB).
        split = split_state_dict_into_shards_factory(
            {n: spec[2] for n, spec in specs.items()}, get_storage_size=lambda nbytes: nbytes,
            filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes)
        self._shards = []
        for fname, names in split.filename_to_tensors.items():
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            off = 0
            for name in names:
                shape, dtype, n = specs[name]
                header[name] = {"dtype": to_name[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
                off += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self._shards.append((fname, raw, [(name, *specs[name]) for name in names]))
        self._order = [(si, e) for si, (_, _, entries) in enumerate(self._shards) for e in entries]
        self._pos = 0
        self._fh = None
        self._fh_index = -1
        self.weight_map: dict[str, str] = {}
        self.total_bytes = sum(e[3] for _, e in self._order)

    @property
    def files(self) -> list[str]:
        """Shard file names."""
        return [s[0] for s in self._shards]

    @property
    def order(self) -> list[str]:
        """Tensor names in the order they must be written."""
        return [e[0] for _, e in self._order]

    def _open(self, si: int) -> None:
        self._close_current()
        fname, raw, _ = self._shards[si]
        self._fh = open(self.out_dir / fname, "wb")
        self._fh_index = si
        self._put(len(raw).to_bytes(8, "little") + raw)

    def _put(self, data: Any) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:  # name the shard (a full disk is reported by atomic_dir)
            exc.filename = exc.filename or str(self.out_dir / self._shards[self._fh_index][0])
            raise

    def _close_current(self) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            with fh:
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # a full disk may show only here; name the shard
            exc.filename = exc.filename or fh.name
            raise

    def write(self, name: str, pieces: Iterable[Any]) -> int:
        """Write the next tensor of :attr:`order` from its flat pieces; returns its byte count.

        Raises:
            ModelError: out of order, or the pieces do not add up to the planned size/dtype.
        """
        import torch

        if self._pos >= len(self._order):
            raise ModelError(f"tensor {name}: not in the output plan")
        si, (pname, shape, dtype, n) = self._order[self._pos]
        if pname != name:
            raise ModelError(f"tensor {name}: written out of order (expected {pname})")
        if self._fh_index != si:
            self._open(si)
        got = 0
        for piece in pieces:
            if piece.dtype != dtype:
                raise ModelError(f"tensor {name}: produced {piece.dtype}, planned {dtype}")
            piece = piece.detach().contiguous().reshape(-1)
            if piece.numel() == 0:
                continue
            data = piece.view(torch.uint8).numpy()
            self._put(memoryview(data))
            got += data.nbytes
        if got != n:
            raise ModelError(f"tensor {name}: produced {got} bytes, planned {n} ({list(shape)})")
        self.weight_map[name] = self._shards[si][0]
        self._pos += 1
        return n

    def finish(self) -> dict[str, Any]:
        """Close the last shard and write the standard ``model.safetensors.index.json`` (several shards).

        Returns:
            ``{"files": [...], "total_size": bytes, "weight_map": {...}}``.
        """
        from ..io import atomic_write_json

        self._close_current()
        if self._pos != len(self._order):
            missing = self._order[self._pos][1][0]
            raise ModelError(f"tensor {missing}: planned but never written")
        if len(self._shards) > 1:
            atomic_write_json(self.out_dir / "model.safetensors.index.json",
                              {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map})
        return {"files": self.files, "total_size": self.total_bytes, "weight_map": self.weight_map}


def write_tensors(out_dir: str | os.PathLike, tensors: list[OutTensor], max_shard_bytes: int,
                  progress: Any = None, task: str = "write") -> dict[str, Any]:
    """Write planned tensors as sharded safetensors, reporting progress by tensor and bytes.

    The one checkpoint writer: the streaming tools and :func:`~llavamed_core.model.checkpoint.save_checkpoint`
    all write through it, into the temporary directory of :func:`~llavamed_core.io.atomic_dir`.

    Args:
        out_dir: destination directory (already existing).
        tensors: the plan (each producer is called once, in the shards' order).
        max_shard_bytes: shard size limit.
        progress: a :mod:`llavamed_core.progress` callback.
        task: the progress task name.

    Returns:
        What :meth:`ShardedWriter.finish` returns.
    """
    from ..progress import emit

    writer = ShardedWriter(out_dir, [(t.name, t.shape, t.dtype) for t in tensors], max_shard_bytes)
    by_name = {t.name: t for t in tensors}
    done = 0
    emit(progress, task, 0, writer.total_bytes, "B", tensor=0, tensors=len(tensors))
    for i, name in enumerate(writer.order, 1):
        t = by_name[name]
        done += writer.write(t.name, t.produce())
        if t.done is not None:
            t.done()
        emit(progress, task, done, writer.total_bytes, "B", tensor=i, tensors=len(tensors))
    result = writer.finish()
    emit(progress, task, done, writer.total_bytes, "B", finished=True, tensor=len(tensors),
         tensors=len(tensors))
    return result


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike,
                   skip: Iterable[str] = ()) -> list[str]:
    """Copy the non-weight files of a checkpoint directory (config, tokenizer, processor, ...).

    Args:
        src: source directory.
        dst: destination directory.
        skip: file names not to copy.

    Returns:
        The names copied.
    """
    src, dst = Path(src), Path(dst)
    skip = set(skip)
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in skip:
            continue
        if f.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied

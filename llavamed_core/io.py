"""Files that survive a kill: atomic writes, append-and-resume JSONL, streaming JSON arrays.

- :func:`atomic_write` / :func:`atomic_write_json` write to a temporary file in the same folder
  and ``os.replace`` it into place, so a reader sees the old file or the whole new one.
- :func:`atomic_dir` builds a directory under a temporary name and renames it at the end, so a
  killed job never leaves a directory that looks complete.
- :class:`JsonlAppender` appends one record per line, flushed and fsynced; on open it cuts off a
  half-written last line left by a kill, so a rerun resumes cleanly.
- :class:`ResumableJsonl` is the one "which ids are done" of every resumable output (answers,
  reviews, generations): the records already on disk by id, and an append that writes each id once.
- :func:`iter_json_array` streams the elements of a huge top-level JSON array without holding the
  text and the parsed list at once.
- Files and folders made this way get the modes ``open``/``mkdir`` would give them (``0o666`` /
  ``0o777`` less the umask), not the private ``0600``/``0700`` of ``mkstemp``/``mkdtemp``.
- A full disk while writing becomes one :class:`~llavamed_core.errors.StorageError` naming the
  destination; the half-written temporary is removed.
- :func:`check_out_not_overlapping` refuses an output folder that is, contains or lies inside an
  input (``--overwrite`` would otherwise delete the input).
- Readers turn a file that is not UTF-8 (UTF-16, binary) or JSON nested too deeply into a
  :class:`~llavamed_core.errors.DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, StorageError, data_error

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_bytes",
    "atomic_dir",
    "JsonlAppender",
    "ResumableJsonl",
    "read_jsonl",
    "iter_json_array",
    "iter_records",
    "load_json",
    "current_umask",
    "check_out_not_overlapping",
    "check_text_file",
    "reading",
]

_UMASK_LOCK = threading.Lock()
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` tells it (Linux 4.7+)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:  # elsewhere: set and restore (not atomic for other threads creating files)
        old = os.umask(0o022)
        os.umask(old)
    return old


def _storage_error(dest: Path, exc: BaseException, inner: str | None = None) -> StorageError | None:
    """A :class:`StorageError` for a full disk or quota while writing ``dest``, else ``None``.

    ``inner`` names the file inside a folder being built (``model.safetensors``).
    """
    if isinstance(exc, StorageError):
        what = exc.what
    elif isinstance(exc, OSError) and exc.errno in _FULL_DISK:
        what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    else:
        return None
    where = f" while writing {inner}" if inner else ""
    err = StorageError(f"{dest}: {what}{where}; nothing half-written was left",
                       "free some disk space (or choose another output) and rerun")
    err.path, err.what = str(dest), what
    return err


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes ``open``/``mkdir`` would under the umask.

    Some writers ignore the umask (``safetensors`` makes its files 0600), so a folder built by
    :func:`atomic_dir` is set right as a whole before it is renamed into place. Execute bits
    that a file has are kept (less the umask); symbolic links are left alone.
    """
    mask = current_umask()
    for dirpath, _subdirs, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                want = (0o777 if st.st_mode & 0o100 else 0o666) & ~mask
                if stat.S_IMODE(st.st_mode) != want:
                    os.chmod(p, want)


def _relative_name(exc: BaseException, tmp: Path) -> str | None:
    """The file inside ``tmp`` that an error names, relative to ``tmp`` (for messages)."""
    name = getattr(exc, "filename", None) or getattr(exc, "path", None)
    if not name:
        return None
    with contextlib.suppress(ValueError):
        return Path(name).relative_to(tmp).as_posix()
    return Path(name).name


def check_out_not_overlapping(out: str | os.PathLike, inputs: Iterable[tuple[str, Any]],
                              out_flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (symlinks resolved).

    Args:
        out: the output path.
        inputs: ``(flag, path)`` pairs (``("--src", Path("raw"))``); ``None`` paths are skipped.
        out_flag: how the output is named in the message.

    Raises:
        ConfigError: naming both options and both paths.
    """
    o = Path(out).expanduser().resolve()
    for flag, value in inputs:
        if value is None or str(value) == "":
            continue
        i = Path(value).expanduser().resolve()
        if o == i:
            relation = f"is the same path as {flag} {value}"
        elif i in o.parents:
            relation = f"is inside {flag} {value}"
        elif o in i.parents:
            relation = f"contains {flag} {value}"
        else:
            continue
        raise ConfigError(f"{out_flag} {out} {relation}: writing there could destroy the input",
                          f"choose an {out_flag} apart from {flag} {value}: not the same path, "
                          "not inside it, not containing it")


def _decode_problem(path: Path, exc: UnicodeDecodeError) -> DataError:
    """A :class:`DataError` for a file that is not UTF-8 text, telling UTF-16 and binary apart."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        head = b""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) > 8 and head[1::2].count(0) > len(head) // 4):
        kind, hint = "UTF-16 text", f"convert it: iconv -f UTF-16 -t UTF-8 {path} > converted.json"
    elif b"\x00" in head:
        kind, hint = "a binary file", "is this the right file? conversation and record files are UTF-8 JSON"
    else:
        at = _first_bad_utf8(path)
        kind = "invalid UTF-8" + (f" at byte {at:,}" if at is not None else "")
        hint = "save the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
    return data_error(path, None, None, f"not UTF-8 text ({kind})", hint)


def _first_bad_utf8(path: Path) -> int | None:
    """The file offset of the first byte that is not UTF-8, or ``None``."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                pending = len(dec.getstate()[0])
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as exc:
                    return offset - pending + exc.start
                offset += len(chunk)
    except OSError:
        return None
    return None


def check_text_file(path: str | os.PathLike) -> None:
    """Refuse a file whose start holds NUL bytes: UTF-16 without a byte-order mark decodes as
    "valid" UTF-8 full of NULs, and no JSON text contains one.

    Raises:
        DataError: naming the file, UTF-16 or binary.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if b"\x00" in head:
        raise _decode_problem(path, UnicodeDecodeError("utf-8", head, 0, 1, "NUL byte"))


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn decoding failures inside the block into a :class:`DataError` naming ``path``.

    A file that is not UTF-8 (``UnicodeDecodeError``) and JSON nested so deeply that the parser
    runs out of stack (``RecursionError``) are both input problems, not crashes.
    """
    try:
        yield
    except UnicodeDecodeError as exc:
        raise _decode_problem(Path(path), exc) from None
    except RecursionError:
        raise data_error(path, None, None, "JSON nested too deeply to read",
                         "records are flat objects; is this the right file?") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside ``path``; rename it onto ``path`` when the block ends cleanly.

    Args:
        path: final destination.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: text encoding (ignored for binary mode).

    Yields:
        The open temporary file. On an exception the temporary file is removed and ``path`` is
        left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: give what open() would
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _storage_error(path, exc) if isinstance(exc, OSError) else None
        if full is not None:
            raise full from None
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically. Returns the path."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Build a directory under a temporary sibling name and rename it to ``path`` at the end.

    Args:
        path: the final directory.
        overwrite: replace an existing ``path``; otherwise an existing non-empty ``path`` is an error.

    Yields:
        The temporary directory to fill.

    Raises:
        DataError: ``path`` exists, is not empty, and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise DataError(f"{path}: output directory exists and is not empty",
                        "choose another --out, or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run killed earlier left its half-built directory under a hidden name: remove it.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        _apply_umask(tmp)  # mkdtemp makes 0700, safetensors 0600: give what mkdir()/open() would
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _storage_error(path, exc, _relative_name(exc, tmp))
        if full is not None:
            raise full from None
        raise


def _truncate_partial_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write interrupted by a kill)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # Walk back to the previous newline.
        pos = size - 1
        chunk = 65536
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            buf = fh.read(pos - start)
            idx = buf.rfind(b"\n")
            if idx >= 0:
                fh.truncate(start + idx + 1)
                return
            pos = start
        fh.truncate(0)


class JsonlAppender:
    """Append JSON records to a file one line at a time, durable against kills.

    On open, a half-written last line (no trailing newline) is cut off. Each :meth:`write` emits one
    complete line with a single ``write`` call, then flushes and fsyncs, so at most the record in
    flight is lost.

    Args:
        path: the JSONL file (created if missing).
        fsync: fsync after each record (default true).
        lazy: open (and create) the file at the first :meth:`write` only, so that a run with
            nothing to record leaves no empty file (failure lists).
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True, lazy: bool = False):
        self.path = Path(path)
        self._fsync = fsync
        self._fh: Any = None
        if not lazy:
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _truncate_partial_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """Append one record as a line.

        Raises:
            StorageError: the disk is full (the complete lines so far stay; a reopen cuts a partial one).
        """
        if self._fh is None:
            self._open()
        try:
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            if exc.errno not in _FULL_DISK:
                raise
            what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
            err = StorageError(f"{self.path}: {what}; the complete records written so far are kept",
                               "free some disk space and rerun the same command: it resumes")
            err.path, err.what = str(self.path), what
            raise err from None

    def close(self) -> None:
        """Close the file."""
        if self._fh is not None:
            self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike, allow_partial_tail: bool = True) -> Iterator[dict]:
    """Yield the objects of a JSONL file, one per non-empty line.

    Args:
        path: the file.
        allow_partial_tail: ignore an unterminated, unparsable last line (a kill mid-write), which
            :class:`JsonlAppender` would cut off on the next append.

    Raises:
        DataError: a line that is not a JSON object (naming file and line).
    """
    for _lineno, obj in _numbered_jsonl(Path(path), allow_partial_tail):
        yield obj


def _numbered_jsonl(path: Path, allow_partial_tail: bool = True) -> Iterator[tuple[int, dict]]:
    """:func:`read_jsonl` with each object's line number (for messages naming the line)."""
    with reading(path), open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if allow_partial_tail and not line.endswith("\n"):
                    return
                raise data_error(path, f"line {lineno}", None, f"not valid JSON ({exc.msg})",
                                 "fix or remove that line") from None
            if not isinstance(obj, dict):
                raise data_error(path, f"line {lineno}", None,
                                 f"expected a JSON object, found {type(obj).__name__}")
            yield lineno, obj


class ResumableJsonl:
    """A JSONL output that a rerun resumes, keyed by one id field of its records.

    On open the records already in the file are read by ``str(record[key])``: a torn last line
    (a kill mid-write) is ignored here and cut off at the first append; a later line repeating an
    id is counted in :attr:`duplicates` and ignored (the first record of an id wins). :meth:`write`
    appends one record per line through :class:`JsonlAppender` (flushed and fsynced) and skips an id
    already in the file, so a resumed run writes no id twice and ends with the records a run
    without interruption would have written.
    Entering it as a context manager creates the file at once (a run that answers nothing still
    leaves its, empty, output); :meth:`write` alone creates it at the first record.

    Args:
        path: the JSONL file (it need not exist).
        key: the id field (``question_id``, ``pair_id``).
        what: how messages name the file's records ("the existing reviews").
        hint: what to do about a record without ``key`` (the file is probably another kind).

    Raises:
        DataError: a line that is not a JSON object, or a record without ``key`` (naming the
            file, the line and the field).
    """

    def __init__(self, path: str | os.PathLike, key: str, what: str = "the existing output",
                 hint: str = "is the output another kind of file? choose a new path"):
        self.path = Path(path)
        self.key = key
        self.done: dict[str, dict] = {}  # the records on disk and written since, by str(id), in order
        self.duplicates = 0  # lines whose id an earlier line already had (ignored)
        self._out: JsonlAppender | None = None
        if self.path.exists():
            for lineno, rec in _numbered_jsonl(self.path):
                rid = rec.get(key)
                if rid is None or isinstance(rid, (dict, list)):
                    raise data_error(self.path, f"line {lineno}", key, f"missing in {what}", hint)
                if str(rid) in self.done:
                    self.duplicates += 1
                    continue
                self.done[str(rid)] = rec

    def __contains__(self, rid: object) -> bool:
        return str(rid) in self.done

    def __len__(self) -> int:
        return len(self.done)

    def pending(self, items: Iterable[Any], id_of: Any) -> list[Any]:
        """The items whose id (``id_of(item)``) is not done yet, in their order."""
        return [item for item in items if str(id_of(item)) not in self.done]

    def write(self, record: dict) -> bool:
        """Append ``record`` unless its id is done already. Returns whether it was written.

        Raises:
            StorageError: the disk is full (the complete records so far stay).
        """
        rid = str(record[self.key])
        if rid in self.done:
            return False
        if self._out is None:
            self._out = JsonlAppender(self.path)
        self._out.write(record)
        self.done[rid] = record
        return True

    def drop(self, unwanted: Any) -> int:
        """Remove the records for which ``unwanted(record)`` is true; rewrites the file atomically.

        Returns:
            How many were removed (the file is left alone when none is).
        """
        gone = [rid for rid, rec in self.done.items() if unwanted(rec)]
        if gone:
            self.close()
            for rid in gone:
                del self.done[rid]
            self.rewrite(list(self.done))
        return len(gone)

    def rewrite(self, order: list[str]) -> None:
        """Rewrite the file atomically: the records of ``order`` (ids) first, then the others."""
        self.close()
        first = [rid for rid in dict.fromkeys(order) if rid in self.done]
        listed = set(first)
        rest = [rid for rid in self.done if rid not in listed]
        with atomic_write(self.path) as fh:
            for rid in first + rest:
                fh.write(json.dumps(self.done[rid], ensure_ascii=False) + "\n")
        self.done = {rid: self.done[rid] for rid in first + rest}
        self.duplicates = 0

    def close(self) -> None:
        """Close the file (a later :meth:`write` reopens it)."""
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> "ResumableJsonl":
        """Open the file for appending now (creating it, cutting a torn last line)."""
        if self._out is None:
            self._out = JsonlAppender(self.path)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_json_array(path: str | os.PathLike, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Stream the elements of a file holding one top-level JSON array.

    Reads ``chunk_size`` characters at a time and decodes element by element, so memory stays near
    one element plus one chunk instead of the whole text plus the whole parsed list.

    Raises:
        DataError: the file is not a JSON array or is malformed (with the element index).
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    with reading(path), open(path, encoding="utf-8") as fh:
        buf = ""
        pos = 0
        eof = False

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            more = fh.read(chunk_size)
            if not more:
                eof = True
                return False
            buf = buf[pos:] + more
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        fill()
        if buf.startswith("\ufeff"):
            pos = 1
        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise data_error(path, None, None, "expected a JSON array ('[' at the start)",
                             "is this a JSONL file? conversation files are JSON arrays")
        pos += 1
        index = 0
        skip_ws()
        if pos < len(buf) and buf[pos] == "]":
            return
        while True:
            skip_ws()
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as exc:
                    if fill():
                        continue
                    raise data_error(path, f"#{index}", None, f"malformed JSON ({exc.msg})") from None
                # The element is complete only once the delimiter after it is in the buffer: a
                # number cut by the chunk boundary ("0" of "0.5") decodes early otherwise.
                j = end
                while j < len(buf) and buf[j] in " \t\r\n":
                    j += 1
                if (j >= len(buf) or buf[j] not in ",]") and fill():
                    continue
                break
            pos = end
            yield obj
            index += 1
            skip_ws()
            if pos >= len(buf):
                raise data_error(path, f"#{index}", None, "unexpected end of file inside the array",
                                 "the file may be truncated; download it again")
            ch = buf[pos]
            pos += 1
            if ch == "]":
                return
            if ch != ",":
                raise data_error(path, f"#{index}", None, f"expected ',' or ']', found {ch!r}")


def load_json(path: str | os.PathLike) -> Any:
    """Load a whole JSON file, with a :class:`DataError` naming the file and position on failure."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found", "check the path")
    check_text_file(path)
    try:
        with reading(path), open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise data_error(path, f"line {exc.lineno}", None, f"not valid JSON ({exc.msg})") from None


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """Yield records of a JSON array file or a JSONL file, decided by the first non-blank byte.

    Raises:
        DataError: missing file, or content that is neither.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found", "check the path")
    check_text_file(path)
    with reading(path), open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        for i, obj in enumerate(iter_json_array(path)):
            if not isinstance(obj, dict):
                raise data_error(path, f"#{i}", None, f"expected an object, found {type(obj).__name__}")
            yield obj
    elif head.startswith("{"):
        yield from read_jsonl(path)
    elif not head:
        return
    else:
        raise data_error(path, None, None, "neither a JSON array nor JSON lines")


def write_records_json(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as a JSON array (one record per line inside it), atomically."""
    with atomic_write(path) as fh:
        fh.write("[")
        first = True
        for rec in records:
            fh.write("\n" if first else ",\n")
            fh.write(json.dumps(rec, ensure_ascii=False))
            first = False
        fh.write("\n]\n")
    return Path(path)


__all__.append("write_records_json")

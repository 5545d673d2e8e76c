"""The simulator's uploaded files: where their bytes live on disk and which byte ranges have arrived.

Bytes are streamed to a per-simulator temporary directory and never held whole in memory: a 600 MB
upload costs the simulator about one write buffer. A file's name (its `filePath`, partition folders
included) is kept in memory and mapped to an opaque name on disk, so names such as `a` and `a/b`,
or characters a filesystem dislikes, never collide there. Blocking disk work runs in a worker
thread so a large upload does not stall the other calls. HTTP is `simulator.py`'s; this module only
knows bytes and ranges.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 64 * 1024  # bytes read from the request at a time
FLUSH_AT = 1024 * 1024  # bytes gathered before one write in the worker thread
READ_CHUNK = 1024 * 1024  # bytes read at a time when hashing or counting records

Range = tuple[int, int]  # half-open [start, end)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)(?:/(\d+|\*))?")


def bad_file_path(file_path: str) -> str | None:
    """Why a `filePath` is refused, or None. Folders are kept (they denote partitions), but a `..`,
    `.` or empty segment could only mean a client bug or an escape from the batch's folder."""
    if any(segment in ("", ".", "..") for segment in file_path.split("/")):
        return f"The file path {file_path!r} must not have empty, '.' or '..' segments"
    if "\x00" in file_path:
        return "The file path must not contain a NUL character"
    return None


def parse_content_range(header: str | None) -> tuple[int, int, int | None]:
    """`bytes {start}-{end}/{total}` or `bytes {start}-{end}` (end inclusive; total may be `*`) as
    (start, end exclusive, total or None); ValueError says what is wrong."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        raise ValueError(f"Content-Range {header!r} is not 'bytes <start>-<end>[/<total>]'")
    start, last = int(match[1]), int(match[2])
    total = None if match[3] in (None, "*") else int(match[3])
    if last < start:
        raise ValueError(f"Content-Range {header!r} ends before it starts")
    if total is not None and last >= total:
        raise ValueError(f"Content-Range {header!r} ends past the file's size")
    return start, last + 1, total


def add_range(ranges: Sequence[Range], start: int, end: int) -> list[Range]:
    """`ranges` (sorted, disjoint) with [start, end) added, touching ranges merged. A new list: a
    writer holding the old one keeps a consistent picture."""
    merged: list[Range] = []
    for a, b in sorted([*ranges, (start, end)]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def remove_range(ranges: Sequence[Range], start: int, end: int) -> list[Range]:
    kept: list[Range] = []
    for a, b in ranges:
        if a < start:
            kept.append((a, min(b, start)))
        if b > end:
            kept.append((max(a, end), b))
    return kept


def first_gap(ranges: Sequence[Range], size: int) -> Range | None:
    """The first part of [0, size) that no range covers."""
    position = 0
    for a, b in ranges:
        if a > position:
            return position, min(a, size)
        position = max(position, b)
        if position >= size:
            return None
    return (position, size) if position < size else None


@dataclass
class StoredFile:
    """One file of a batch. A small (PUT) file is complete at once; a large one is complete after
    its COMPLETE action found every byte of [0, size) received."""

    path: Path
    large: bool
    complete: bool
    received: list[Range] = field(default_factory=list)
    total: int | None = None  # the size a Content-Range announced, if any did
    clash: Range | None = None  # the first range sent twice with different bytes
    writers: int = 0  # PATCH bodies being written now

    @property
    def size(self) -> int:
        if self.total is not None:
            return self.total
        return self.received[-1][1] if self.received else 0

    @property
    def prefix(self) -> int:
        """How many bytes from offset 0 arrived without a gap (what HEAD and PATCH report)."""
        return self.received[0][1] if self.received and self.received[0][0] == 0 else 0


@dataclass(frozen=True)
class Summary:
    """What processing a batch needs to know of its files."""

    file_count: int
    byte_size: int
    record_count: int
    empty_files: tuple[str, ...]


def _open(path: Path, create: bool) -> BinaryIO:
    return path.open("wb" if create else "r+b")


def _write_at(
    handle: BinaryIO, position: int, data: bytes | bytearray, known: Sequence[Range]
) -> Range | None:
    """Write `data` at `position`; return the first part of it that overwrote already received
    bytes with different ones (identical re-sends are a retry, not an error)."""
    clash = None
    for a, b in known:
        low, high = max(a, position), min(b, position + len(data))
        if low < high and clash is None:
            handle.seek(low)
            if handle.read(high - low) != data[low - position : high - position]:
                clash = (low, high)
    handle.seek(position)
    handle.write(data)
    return clash


def _records(path: Path) -> tuple[int, int]:
    """(bytes, records) of a file on disk: its newlines, plus one for a last line without one."""
    size = records = 0
    last = b""
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            size += len(chunk)
            records += chunk.count(b"\n")
            last = chunk[-1:]
    return size, records + (1 if size and last != b"\n" else 0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


async def _stream_to(
    path: Path,
    chunks: AsyncIterable[bytes],
    *,
    create: bool,
    offset: int = 0,
    limit: int | None = None,
    known: Sequence[Range] = (),
) -> tuple[int, Range | None]:
    """Write the stream into `path` from `offset`, at most `limit` bytes of it. Returns how many
    bytes the stream had (all are read and counted, the excess is dropped, so the caller can refuse
    a body of the wrong length) and the first received range overwritten with different bytes."""
    handle = await asyncio.to_thread(_open, path, create)
    try:
        seen = 0
        position = offset
        clash: Range | None = None
        buffer = bytearray()
        async for chunk in chunks:
            room = len(chunk) if limit is None else max(0, limit - seen)
            seen += len(chunk)
            buffer += chunk[:room]
            if len(buffer) >= FLUSH_AT:
                # Hand the buffer over and start a new one: no copy of the bytes in flight.
                data, buffer = buffer, bytearray()
                found = await asyncio.to_thread(_write_at, handle, position, data, known)
                clash = clash or found
                position += len(data)
        if buffer:
            found = await asyncio.to_thread(_write_at, handle, position, buffer, known)
            clash = clash or found
        return seen, clash
    finally:
        await asyncio.to_thread(handle.close)


class FileStore:
    """Every file uploaded, by batch id and file name. `parent` is where the per-simulator
    temporary directory is made (the system's temporary directory when None); that directory
    is created at the first upload and removed by `clear`."""

    def __init__(self, parent: str | None = None) -> None:
        self.parent = parent
        self._root: Path | None = None
        self._files: dict[str, dict[str, StoredFile]] = {}
        self._uploading: Counter[str] = Counter()
        self._names = itertools.count()

    def clear(self) -> None:
        root, self._root = self._root, None
        self._files.clear()
        self._uploading.clear()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    @property
    def root(self) -> Path | None:
        return self._root

    def _new_path(self, batch_id: str) -> Path:
        if self._root is None:
            if self.parent is not None:
                os.makedirs(self.parent, exist_ok=True)
            self._root = Path(tempfile.mkdtemp(prefix="aep-sim-files-", dir=self.parent))
        folder = self._root / batch_id
        folder.mkdir(exist_ok=True)
        return folder / f"{next(self._names):08d}.bin"

    def get(self, batch_id: str, name: str) -> StoredFile | None:
        return self._files.get(batch_id, {}).get(name)

    def of(self, batch_id: str) -> dict[str, StoredFile]:
        return dict(self._files.get(batch_id, {}))

    def batch_ids(self) -> list[str]:
        return list(self._files)

    def count(self) -> int:
        return sum(len(files) for files in self._files.values())

    def _put(self, batch_id: str, name: str, stored: StoredFile) -> bool:
        """Make `stored` the file called `name`; True when it replaced one."""
        files = self._files.setdefault(batch_id, {})
        old = files.get(name)
        files[name] = stored
        if old is not None and old.path != stored.path:
            _unlink(old.path)
        return old is not None

    @contextlib.contextmanager
    def uploading(self, batch_id: str) -> Iterator[None]:
        """Mark a body being received for the batch: a batch COMPLETE must not cut it in half."""
        self._uploading[batch_id] += 1
        try:
            yield
        finally:
            self._uploading[batch_id] -= 1
            if not self._uploading[batch_id]:
                del self._uploading[batch_id]

    def busy(self, batch_id: str) -> bool:
        return self._uploading[batch_id] > 0

    async def receive(self, batch_id: str, chunks: AsyncIterable[bytes]) -> tuple[Path, int]:
        """Stream a whole (small) file to a new path of the batch's: (path, size). Nothing is named
        yet; `store` or `discard` follows. A body cut short leaves nothing behind."""
        path = self._new_path(batch_id)
        try:
            size, _ = await _stream_to(path, chunks, create=True)
        except BaseException:
            _unlink(path)
            raise
        return path, size

    def store(self, batch_id: str, name: str, path: Path, size: int) -> bool:
        """Name a received small file; True when it replaced a file of that name (PUT is idempotent)."""
        received = [(0, size)] if size else []
        return self._put(batch_id, name, StoredFile(path, large=False, complete=True, received=received))

    def discard(self, path: Path) -> None:
        _unlink(path)

    def initialize(self, batch_id: str, name: str) -> None:
        """Start a large file, empty and unfinished; one of that name, finished or not, is reset."""
        path = self._new_path(batch_id)
        _open(path, create=True).close()
        self._put(batch_id, name, StoredFile(path, large=True, complete=False))

    async def write_part(self, stored: StoredFile, start: int, end: int, chunks: AsyncIterable[bytes]) -> int:
        """Write a PATCH body at [start, end) of a large file; returns the body's length. The range
        counts as received only when the length is right, and is forgotten otherwise (its bytes on
        disk may have changed)."""
        stored.writers += 1
        try:
            seen, clash = await _stream_to(
                stored.path, chunks, create=False, offset=start, limit=end - start, known=stored.received
            )
        except BaseException:
            stored.received = remove_range(stored.received, start, end)
            raise
        finally:
            stored.writers -= 1
        if seen != end - start:
            stored.received = remove_range(stored.received, start, end)
            return seen
        stored.received = add_range(stored.received, start, end)
        if stored.clash is None and clash is not None:
            stored.clash = clash
        return seen

    def finish(self, stored: StoredFile) -> str | None:
        """Complete a large file: None, or why it cannot be (the 400 detail). Ranges are checked here,
        when the parts are stitched together, as AEP does (reference §2.2)."""
        if stored.writers:
            return "parts are still being uploaded"
        if stored.clash is not None:
            low, high = stored.clash
            return f"bytes {low}-{high - 1} were uploaded twice with different content"
        gap = first_gap(stored.received, stored.size)
        if gap is not None:
            return f"bytes {gap[0]}-{gap[1] - 1} of {stored.size} were never uploaded"
        # A refused PATCH may have written past the end; the file is exactly what was received.
        os.truncate(stored.path, stored.size)
        stored.complete = True
        return None

    async def summarize(self, batch_id: str) -> Summary:
        files = self.of(batch_id)
        counted = [await asyncio.to_thread(_records, stored.path) for stored in files.values()]
        return Summary(
            file_count=len(files),
            byte_size=sum(size for size, _ in counted),
            record_count=sum(records for _, records in counted),
            empty_files=tuple(name for name, (size, _) in zip(files, counted, strict=True) if size == 0),
        )


def describe(files: Mapping[str, StoredFile]) -> dict[str, dict[str, Any]]:
    """Each file's size, SHA-256 (of what is on disk, read in chunks) and whether it is finished.
    Blocking: give it a snapshot (`FileStore.of`) when running it in a thread."""
    return {
        name: {"size": stored.size, "sha256": _sha256(stored.path), "complete": stored.complete}
        for name, stored in sorted(files.items())
    }

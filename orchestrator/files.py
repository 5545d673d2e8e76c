"""Where a request's files come from: paths under ORCH_UPLOAD__ROOT, or URLs fsspec opens.

A relative path never leaves the root: `..` is refused when the message is read (`messages.file_ref`),
and here the path is resolved, links and all, and must still lie under the root, both when the message
is received and again when the file is opened for upload (a link swapped in between is caught). A
`file://` URL must lie under the root too: a message must not be able to send any file of the host to
AEP. Other protocols (`s3://`, `gs://`, `abfs://`, …) are taken when ORCH_UPLOAD__PROTOCOLS lists them
and their fsspec filesystem is installed (the `s3`, `gcs` and `azure` extras).

Files are read in chunks of `CHUNK` bytes on a worker thread, never whole: a 600 MB file costs a chunk
of memory at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from orchestrator.messages import FileRef, InvalidMessage

CHUNK = 1024 * 1024
# The extra that installs each cloud filesystem (pyproject.toml).
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "abfs": "azure",
    "az": "azure",
    "abfss": "azure",
}


class SourceError(Exception):
    """A file cannot be uploaded and will not become uploadable by trying again (gone, refused,
    not a file): the request fails with this reason."""


@dataclass(frozen=True)
class Source:
    """An opened file entry: its size, and its bytes on demand."""

    ref: FileRef
    size: int
    _path: Path | None  # a local file
    _url: str | None  # or an fsspec URL

    async def chunks(self, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """`length` bytes from `start` (to the end by default), a chunk at a time. Opens the file
        anew on each call, so a call that is sent again reads it again."""
        remaining = self.size - start if length is None else length
        try:
            handle = await asyncio.to_thread(self._open)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            raise SourceError(f"{self.ref.source}: {exc.strerror or type(exc).__name__}") from None
        try:
            if start:
                await asyncio.to_thread(handle.seek, start)
            while remaining > 0:
                chunk: bytes = await asyncio.to_thread(handle.read, min(CHUNK, remaining))
                if not chunk:
                    raise SourceError(
                        f"{self.ref.source}: ended {remaining} bytes early (changed while read?)"
                    )
                remaining -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    def _open(self) -> IO[bytes]:
        if self._path is not None:
            return self._path.open("rb")
        import fsspec

        opened: Any = fsspec.open(self._url, "rb").open()
        return opened  # type: ignore[no-any-return]


class FileSources:
    """Checks and opens the files messages name (ORCH_UPLOAD__ROOT, ORCH_UPLOAD__PROTOCOLS)."""

    def __init__(self, root: Path | None, protocols: Iterable[str]) -> None:
        self._root = root.resolve() if root is not None else None
        self._protocols = frozenset(protocol.lower() for protocol in protocols)

    def check(self, refs: Iterable[FileRef]) -> None:
        """Refuse a message whose files cannot be uploaded (`InvalidMessage` with the reason): a path
        outside the root, a protocol not accepted or not installed, a local file that is missing."""
        for index, ref in enumerate(refs):
            self._locate(ref, f"files[{index}]")

    async def open(self, ref: FileRef) -> Source:
        """The file, checked again, with its size (`SourceError` when it cannot be read)."""
        try:
            path, url = self._locate(ref, ref.source)
        except InvalidMessage as exc:
            raise SourceError(str(exc)) from None
        try:
            if path is not None:
                size = (await asyncio.to_thread(path.stat)).st_size
            else:
                assert url is not None
                size = await asyncio.to_thread(_remote_size, url)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            raise SourceError(f"{ref.source}: {exc.strerror or type(exc).__name__}") from None
        return Source(ref, size, path, url)

    def _locate(self, ref: FileRef, where: str) -> tuple[Path | None, str | None]:
        protocol = ref.protocol
        if protocol is None:
            if self._root is None:
                raise InvalidMessage(f"{where}: a relative path needs ORCH_UPLOAD__ROOT, which is not set")
            return self._inside(self._root / ref.source, where), None
        if protocol not in self._protocols:
            accepted = ", ".join(sorted(self._protocols)) or "none"
            raise InvalidMessage(
                f"{where}: {protocol}:// is not accepted (ORCH_UPLOAD__PROTOCOLS: {accepted})"
            )
        if protocol == "file":
            if self._root is None:
                raise InvalidMessage(
                    f"{where}: file:// URLs must lie under ORCH_UPLOAD__ROOT, which is not set"
                )
            return self._inside(Path(unquote(urlsplit(ref.source).path)), where), None
        _filesystem(protocol, where)
        # fsspec knows protocols in lower case only; the scheme is case-insensitive (RFC 3986).
        return None, protocol + ref.source[len(protocol) :]

    def _inside(self, path: Path, where: str) -> Path:
        assert self._root is not None
        real = path.resolve()  # follows every link: where the bytes really are
        if not real.is_relative_to(self._root):
            raise InvalidMessage(f"{where}: leads outside ORCH_UPLOAD__ROOT")
        if not real.is_file():
            raise InvalidMessage(f"{where}: no such file under ORCH_UPLOAD__ROOT")
        return real


def _filesystem(protocol: str, where: str) -> None:
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        extra = EXTRAS.get(protocol)
        hint = f": install aep-orchestrator[{extra}]" if extra else ""
        raise InvalidMessage(f"{where}: the {protocol}:// filesystem is not installed{hint}") from None
    except ValueError:
        raise InvalidMessage(f"{where}: {protocol}:// is not a filesystem fsspec knows") from None


def _remote_size(url: str) -> int:
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(url)
    info = filesystem.info(path)
    if info.get("type") not in (None, "file"):
        raise IsADirectoryError(21, "not a file", url)
    return int(info["size"])

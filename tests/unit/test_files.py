"""Where a request's files come from: local paths kept under the root, URLs opened by fsspec, and their
bytes read back in bounded chunks."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from orchestrator import files
from orchestrator.files import FileSources, Source, SourceError
from orchestrator.messages import InvalidMessage, file_ref

# A directory of its own in fsspec's process-wide memory filesystem, removed after each test.
MEMORY_DIR = "/orch-test-files"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    (path / "part=a").mkdir(parents=True)
    (path / "part=a" / "x.json").write_bytes(b'{"a": 1}\n')
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.json").write_bytes(b'{"secret": true}\n')
    return path


@pytest.fixture
def memory() -> Iterator[fsspec.AbstractFileSystem]:
    filesystem = fsspec.filesystem("memory")
    yield filesystem
    if filesystem.exists(MEMORY_DIR):
        filesystem.rm(MEMORY_DIR, recursive=True)


def refuse(sources: FileSources, entry: str) -> str:
    with pytest.raises(InvalidMessage) as info:
        sources.check([file_ref(entry)])
    return str(info.value)


async def read(source: Source, start: int = 0, length: int | None = None) -> list[bytes]:
    return [chunk async for chunk in source.chunks(start, length)]


# --- check ----------------------------------------------------------------------------------------


def test_a_file_under_the_root_is_accepted(root: Path) -> None:
    FileSources(root, []).check([file_ref("part=a/x.json")])


def test_a_link_that_stays_inside_the_root_is_accepted(root: Path) -> None:
    (root / "alias.json").symlink_to(root / "part=a" / "x.json")
    FileSources(root, []).check([file_ref("alias.json")])


def test_a_relative_path_needs_a_root() -> None:
    assert "needs ORCH_UPLOAD__ROOT" in refuse(FileSources(None, ["file", "memory"]), "part=a/x.json")


def test_a_link_out_of_the_root_is_refused(root: Path, outside: Path) -> None:
    (root / "link.json").symlink_to(outside / "secret.json")
    (root / "dir").symlink_to(outside)
    sources = FileSources(root, [])
    assert "leads outside ORCH_UPLOAD__ROOT" in refuse(sources, "link.json")
    assert "leads outside ORCH_UPLOAD__ROOT" in refuse(sources, "dir/secret.json")


def test_a_missing_file_is_refused(root: Path) -> None:
    assert "no such file" in refuse(FileSources(root, []), "part=a/missing.json")


def test_a_directory_is_refused(root: Path) -> None:
    assert "no such file" in refuse(FileSources(root, []), "part=a")


def test_the_reason_names_the_entry(root: Path) -> None:
    with pytest.raises(InvalidMessage, match=r"^files\[1\]: no such file"):
        FileSources(root, []).check([file_ref("part=a/x.json"), file_ref("gone.json")])


def test_a_protocol_not_accepted_is_refused(root: Path) -> None:
    why = refuse(FileSources(root, ["s3", "memory"]), "gs://bucket/x.json")
    assert "gs:// is not accepted" in why
    assert "memory, s3" in why
    assert "(ORCH_UPLOAD__PROTOCOLS: none)" in refuse(FileSources(root, []), "memory://x/y.json")


def test_file_urls_inside_the_root_are_accepted(root: Path) -> None:
    url = (root / "part=a" / "x.json").as_uri()
    assert url.startswith("file:///")
    FileSources(root, ["file"]).check([file_ref(url)])


def test_file_urls_are_percent_decoded(root: Path) -> None:
    (root / "a b.json").write_bytes(b"{}")
    FileSources(root, ["file"]).check([file_ref((root / "a b.json").as_uri())])  # file:///…/a%20b.json


def test_file_urls_outside_the_root_are_refused(root: Path, outside: Path) -> None:
    sources = FileSources(root, ["file"])
    assert "leads outside" in refuse(sources, (outside / "secret.json").as_uri())
    assert "leads outside" in refuse(sources, "file:///etc/passwd")
    # An encoded `..` passes the message's segment check, and is still caught here.
    sneaky = (root / "part=a").as_uri() + "/%2E%2E/%2E%2E/outside/secret.json"
    assert "leads outside" in refuse(sources, sneaky)


def test_file_urls_need_a_root(outside: Path) -> None:
    why = refuse(FileSources(None, ["file"]), (outside / "secret.json").as_uri())
    assert "must lie under ORCH_UPLOAD__ROOT, which is not set" in why


def test_file_urls_need_file_in_the_protocols(root: Path) -> None:
    assert "file:// is not accepted" in refuse(FileSources(root, []), (root / "part=a" / "x.json").as_uri())


def test_a_protocol_fsspec_does_not_know_is_refused(root: Path) -> None:
    why = refuse(FileSources(root, ["nosuchfs"]), "nosuchfs://bucket/x.json")
    assert "nosuchfs:// is not a filesystem fsspec knows" in why


def test_a_protocol_whose_filesystem_is_not_installed_is_refused(root: Path) -> None:
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    why = refuse(FileSources(root, ["s3"]), "s3://bucket/x.json")
    assert "the s3:// filesystem is not installed" in why
    assert "aep-orchestrator[s3]" in why


def test_protocols_are_matched_without_case() -> None:
    FileSources(None, ["MEMORY"]).check([file_ref(f"memory:/{MEMORY_DIR}/x.json")])


def test_memory_urls_are_accepted_when_listed(memory: fsspec.AbstractFileSystem) -> None:
    memory.pipe(f"{MEMORY_DIR}/data/x.json", b"{}")
    FileSources(None, ["memory"]).check([file_ref(f"memory:/{MEMORY_DIR}/data/x.json")])


# --- open and chunks --------------------------------------------------------------------------------


async def test_open_gives_the_size_and_chunks_the_bytes(root: Path) -> None:
    data = bytes(range(256)) * 3 + b"tail"
    (root / "part=a" / "big.bin").write_bytes(data)
    ref = file_ref("part=a/big.bin")

    source = await FileSources(root, []).open(ref)

    assert source.ref == ref
    assert source.size == len(data) == 772
    assert b"".join(await read(source)) == data
    assert b"".join(await read(source, 100, 50)) == data[100:150]
    assert b"".join(await read(source, 700)) == data[700:]
    assert await read(source, 10, 0) == []
    # Each call opens the file anew: reading twice gives the same bytes.
    assert b"".join(await read(source, 100, 50)) == data[100:150]


async def test_chunks_are_at_most_chunk_bytes(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "CHUNK", 7)
    data = b"0123456789" * 5
    (root / "f.bin").write_bytes(data)
    source = await FileSources(root, []).open(file_ref("f.bin"))

    parts = await read(source, 5, 30)

    assert [len(part) for part in parts] == [7, 7, 7, 7, 2]
    assert b"".join(parts) == data[5:35]
    assert [len(part) for part in await read(source)] == [7] * 7 + [1]


async def test_the_real_chunk_size_bounds_a_large_read(root: Path) -> None:
    data = b"\x01" * files.CHUNK + b"\x02" * 10
    (root / "large.bin").write_bytes(data)
    source = await FileSources(root, []).open(file_ref("large.bin"))

    parts = await read(source)

    assert [len(part) for part in parts] == [files.CHUNK, 10]
    assert b"".join(parts) == data


async def test_file_urls_open_like_paths(root: Path) -> None:
    source = await FileSources(root, ["file"]).open(file_ref((root / "part=a" / "x.json").as_uri()))
    assert source.size == 9
    assert b"".join(await read(source)) == b'{"a": 1}\n'


async def test_memory_files_open_and_read(
    memory: fsspec.AbstractFileSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "CHUNK", 4)
    data = b"abcdefghijklmnopqrstuvwxyz"
    memory.pipe(f"{MEMORY_DIR}/data/part=a/x.json", data)
    ref = file_ref(f"memory:/{MEMORY_DIR}/data/part=a/x.json")

    source = await FileSources(None, ["memory"]).open(ref)

    assert source.size == 26
    parts = await read(source, 3, 10)
    assert parts == [b"defg", b"hijk", b"lm"]
    assert b"".join(await read(source)) == data


async def test_a_missing_memory_file_cannot_be_opened(memory: fsspec.AbstractFileSystem) -> None:
    with pytest.raises(SourceError, match="memory://"):
        await FileSources(None, ["memory"]).open(file_ref(f"memory:/{MEMORY_DIR}/nothing.json"))


async def test_a_memory_directory_cannot_be_opened(memory: fsspec.AbstractFileSystem) -> None:
    memory.pipe(f"{MEMORY_DIR}/dir/x.json", b"{}")
    with pytest.raises(SourceError, match="not a file"):
        await FileSources(None, ["memory"]).open(file_ref(f"memory:/{MEMORY_DIR}/dir"))


async def test_a_url_accepted_by_check_can_be_opened_whatever_its_case(
    memory: fsspec.AbstractFileSystem,
) -> None:
    memory.pipe(f"{MEMORY_DIR}/x.json", b"12345")
    ref = file_ref(f"MEMORY:/{MEMORY_DIR}/x.json")
    sources = FileSources(None, ["memory"])
    sources.check([ref])  # accepted

    source = await sources.open(ref)

    assert source.size == 5


async def test_a_file_deleted_after_check_cannot_be_opened(root: Path) -> None:
    sources = FileSources(root, [])
    ref = file_ref("part=a/x.json")
    sources.check([ref])
    (root / "part=a" / "x.json").unlink()

    with pytest.raises(SourceError, match="no such file"):
        await sources.open(ref)


async def test_a_link_swapped_out_of_the_root_after_check_cannot_be_opened(root: Path, outside: Path) -> None:
    link = root / "link.json"
    link.symlink_to(root / "part=a" / "x.json")
    sources = FileSources(root, [])
    ref = file_ref("link.json")
    sources.check([ref])
    link.unlink()
    link.symlink_to(outside / "secret.json")

    with pytest.raises(SourceError, match="leads outside"):
        await sources.open(ref)


async def test_open_refuses_what_check_refuses(root: Path) -> None:
    with pytest.raises(SourceError, match="is not accepted"):
        await FileSources(root, []).open(file_ref("memory://bucket/x.json"))


async def test_a_file_that_shrank_after_open_is_an_error(root: Path) -> None:
    path = root / "part=a" / "x.json"
    source = await FileSources(root, []).open(file_ref("part=a/x.json"))
    assert source.size == 9
    path.write_bytes(b"{}")

    with pytest.raises(SourceError, match="ended 7 bytes early"):
        await read(source)
    with pytest.raises(SourceError, match="early"):
        await read(source, 1, 5)

"""Storage on local disk, memory:// and a real S3 endpoint: visibility, create-only, reads, listing."""

from __future__ import annotations

import random
import threading

import pytest

from shardoptim.checkpoint.durable_write import is_temporary_name, temporary_name
from shardoptim.checkpoint.storage import Storage, check_name
from tests.checkpoint.conftest import BUCKET
from tests.checkpoint.writer_process import kill, start_writer, wait_for_line

DATA = bytes(range(256)) * 40


@pytest.fixture
def storage(storage_root) -> Storage:
    url, options = storage_root
    return Storage(url, options)


def _second_view(storage: Storage) -> Storage:
    """Another Storage on the same root, with its own s3fs instance where there is one (a separate reader)."""
    options = dict(storage.storage_options)
    if options:
        options["skip_instance_cache"] = True
    return Storage(storage.url, options)


@pytest.mark.parametrize(
    "name", ["../x", "/abs", "a//b", "a/./b", "a/../b", "s3://bucket/k", "c:\\x", "a\\b", "", "a\x00b", "x" * 256, "a/"]
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(ValueError, match="unsafe file name"):
        check_name(name)


def test_safe_names_pass():
    assert check_name("step-00001/optim.rank0.a1b2.safetensors") == "step-00001/optim.rank0.a1b2.safetensors"
    with pytest.raises(TypeError):
        check_name(b"x")


def test_write_read_exists_size_list_delete(storage):
    assert not storage.exists("d/f.bin")
    storage.write_bytes("d/f.bin", DATA)
    storage.write_bytes("d/g.bin", b"")
    storage.write_bytes("top.bin", b"t")
    assert storage.exists("d/f.bin") and storage.exists("d")
    assert storage.size("d/f.bin") == len(DATA) and storage.size("d/g.bin") == 0
    assert storage.read_bytes("d/f.bin") == DATA
    assert storage.read_bytes("d/f.bin", 10, 300) == DATA[10:300]
    assert storage.read_bytes("d/f.bin", 5, 5) == b""
    assert storage.list() == ["d", "top.bin"]
    assert storage.list("d") == ["f.bin", "g.bin"]
    assert storage.child("d").read_bytes("f.bin", 0, 3) == DATA[:3]
    assert storage.child("d").url == storage.url_of("d")
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.size("d/nope")
    with pytest.raises(FileNotFoundError):
        storage.list("nope")
    storage.delete("d", recursive=True)
    assert not storage.exists("d/f.bin") and storage.list() == ["top.bin"]
    with pytest.raises(FileNotFoundError):
        storage.delete("d", recursive=True)
    storage.delete("d", recursive=True, missing_ok=True)


def test_reads_past_the_end_are_eof_errors_on_every_backend(storage):
    storage.write_bytes("f", DATA)
    n = len(DATA)
    assert storage.read_bytes("f", n - 6, n) == DATA[-6:]
    with pytest.raises(EOFError, match="f"):
        storage.read_bytes("f", n - 6, n + 10)
    with pytest.raises(EOFError):
        storage.read_bytes("f", n + 5, n + 10)
    with pytest.raises(ValueError):
        storage.read_bytes("f", 10, 5)
    buffer = bytearray(100)
    storage.read_into("f", 7, memoryview(buffer))
    assert bytes(buffer) == DATA[7:107]
    with pytest.raises(EOFError):
        storage.read_into("f", n - 50, memoryview(bytearray(100)))


def test_read_into_uses_bounded_requests(storage_root):
    url, options = storage_root
    storage = Storage(url, options, read_chunk_bytes=1000)
    storage.write_bytes("f", DATA)
    buffer = bytearray(len(DATA) - 3)
    storage.read_into("f", 3, memoryview(buffer))
    assert bytes(buffer) == DATA[3:]


def test_a_file_is_invisible_until_its_write_completes(storage):
    reader = _second_view(storage)
    with storage.open_write("d/f.bin") as f:
        for _ in range(20):
            f.write(DATA)
        f.flush()
        assert not reader.exists("d/f.bin")
        assert "f.bin" not in (reader.list("d") if reader.exists("d") else [])
    assert reader.read_bytes("d/f.bin") == DATA * 20


def test_an_error_mid_write_leaves_nothing_behind(storage):
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write("d/f.bin") as f:
            f.write(DATA * 10)
            raise RuntimeError("boom")
    assert not storage.exists("d/f.bin")
    assert not storage.exists("d") or storage.list("d", include_temporary=True) == []


def test_an_error_mid_write_keeps_the_previous_version(storage):
    storage.write_bytes("f", b"old")
    with pytest.raises(RuntimeError):
        with storage.open_write("f") as f:
            f.write(b"new and partial")
            raise RuntimeError("boom")
    assert storage.read_bytes("f") == b"old"
    storage.write_bytes("f", b"new")
    assert storage.read_bytes("f") == b"new"


def test_an_error_mid_multipart_upload_aborts_it(s3_endpoint):
    # s3fs commits on close, even when leaving `with` through an exception: ours must not.
    storage = Storage(f"s3://{BUCKET}/abort-{random.randrange(1 << 30)}", s3_endpoint)
    with pytest.raises(RuntimeError):
        with storage.open_write("big") as f:
            f.write(b"x" * (17 * 2**20))
            f.flush()  # one 16 MiB part uploaded
            raise RuntimeError("boom")
    assert not storage.exists("big")
    key = storage.root.split("/", 1)[1] + "/big"
    uploads = storage.fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])
    assert [u for u in uploads if u["Key"] == key] == []


def test_create_only_refuses_an_existing_file(storage):
    storage.write_bytes("MANIFEST.json", b"first", exclusive=True)
    with pytest.raises(FileExistsError, match="MANIFEST.json"):
        storage.write_bytes("MANIFEST.json", b"second", exclusive=True)
    assert storage.read_bytes("MANIFEST.json") == b"first"


def test_create_only_race_the_later_commit_loses(storage):
    # Both writers are past their early existence check before either commits.
    first_cm = storage.open_write("MANIFEST.json", exclusive=True)
    second_cm = _second_view(storage).open_write("MANIFEST.json", exclusive=True)
    first, second = first_cm.__enter__(), second_cm.__enter__()
    first.write(b"first" * 1000)
    second.write(b"second" * 1000)
    second_cm.__exit__(None, None, None)
    with pytest.raises(FileExistsError, match="MANIFEST.json"):
        first_cm.__exit__(None, None, None)
    assert storage.read_bytes("MANIFEST.json") == b"second" * 1000
    assert storage.list(include_temporary=True) == ["MANIFEST.json"]


def test_create_only_threads_racing_one_wins(storage):
    views = [_second_view(storage) for _ in range(4)]
    barrier = threading.Barrier(len(views))
    outcomes: dict[int, str] = {}

    def write(index: int) -> None:
        barrier.wait()
        try:
            views[index].write_bytes("MANIFEST.json", str(index).encode() * 5000, exclusive=True)
            outcomes[index] = "won"
        except FileExistsError:
            outcomes[index] = "lost"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(views))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == len(views) and len(winners) == 1
    assert storage.read_bytes("MANIFEST.json") == str(winners[0]).encode() * 5000


def test_temporary_names_are_hidden_and_recognised():
    temp = temporary_name("MANIFEST.json")
    assert is_temporary_name(temp) and not is_temporary_name("MANIFEST.json")
    assert check_name(temp) == temp


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
@pytest.mark.parametrize("exclusive", [False, True])
def test_sigkill_mid_write_shows_no_partial_file(storage, exclusive):
    process = start_writer({
        "url": storage.url, "storage_options": storage.storage_options, "name": "d/big.bin",
        "mode": "stream", "fill": 7, "announce_mib": 18, "exclusive": exclusive,
    })
    wait_for_line(process, "writing")
    assert not storage.exists("d/big.bin")
    kill(process)
    assert not storage.exists("d/big.bin")
    assert [n for n in (storage.list("d") if storage.exists("d") else []) if not is_temporary_name(n)] == []


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_sigkill_mid_overwrite_keeps_the_previous_version(storage):
    storage.write_bytes("d/big.bin", b"previous")
    process = start_writer({
        "url": storage.url, "storage_options": storage.storage_options, "name": "d/big.bin",
        "mode": "stream", "fill": 9, "announce_mib": 18,
    })
    wait_for_line(process, "writing")
    kill(process)
    assert storage.read_bytes("d/big.bin") == b"previous"


def test_other_fsspec_backends_get_temp_name_and_move(tmp_path):
    # dir:// (fsspec's DirFileSystem over local disk) stands for a backend without a strategy of its own.
    storage = Storage("dir://ckpt", {"path": str(tmp_path), "target_protocol": "file"})
    with storage.open_write("d/f.bin") as f:
        f.write(DATA)
        assert not storage.exists("d/f.bin")
    assert storage.read_bytes("d/f.bin") == DATA
    with pytest.raises(RuntimeError):
        with storage.open_write("d/g.bin") as f:
            f.write(DATA)
            raise RuntimeError("boom")
    assert storage.list("d", include_temporary=True) == ["f.bin"]
    storage.write_bytes("MANIFEST.json", b"1", exclusive=True)  # check-then-move here, with a warning
    with pytest.raises(FileExistsError):
        storage.write_bytes("MANIFEST.json", b"2", exclusive=True)
    assert storage.read_bytes("MANIFEST.json") == b"1"


@pytest.mark.parametrize("url, expected", [("memory://", "memory://f"), ("memory://a/", "memory://a/f"), ("/", "/f")])
def test_urls_stay_strings_with_their_scheme(url, expected):
    storage = Storage(url)
    assert storage.url_of("f") == expected
    assert storage.child("c").url_of("f") == expected[:-1] + "c/f"


def test_s3_urls_keep_their_scheme(s3_endpoint):
    storage = Storage(f"s3://{BUCKET}/run/", s3_endpoint)
    assert storage.url == f"s3://{BUCKET}/run" and storage.root == f"{BUCKET}/run"
    assert storage.child("step-1").url_of("MANIFEST.json") == f"s3://{BUCKET}/run/step-1/MANIFEST.json"

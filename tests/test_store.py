"""Tests for the store format (schemas: writer, manifest, reader, verify): the Zarr + Parquet shard store (DESIGN.md section 5). Tiny, CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.errors import StoreFormatError
from schemas.io import file_sha256, fingerprint
from schemas.layout import FORMAT_VERSION, ArraySpec, list_complete_shards, remove_partial_shards, shard_name
from schemas.manifest import read_manifest, write_manifest
from schemas.meta_columns import json_field
from schemas.reader import StoreReader
from schemas.verify import verify_store
from schemas.writer import ShardWriter

SPECS = {
    "resp_ids": ArraySpec("int32", (4,)),
    "resp_logprobs": ArraySpec("float32", (4,)),
    "saliency": ArraySpec("float16", ()),
}
ROW_COUNTS = [3, 0, 5, 1, 7, 2]  # includes a sample with 0 rows


def make_sample(i: int, rows: int, rng: np.random.Generator) -> tuple[str, dict, dict]:
    meta = {
        "n_tokens": 10 + i,
        "score": 0.5 * i,
        "image_hash": f"h{i:03d}",
        "input_ids": list(range(i, i + 4)),
        "turns": [[0, i], [i + 1, i + 3]],
        "grids": {"images": [{"h": 2, "w": 3 + i}], "note": None},
    }
    arrays = {
        "resp_ids": rng.integers(0, 1000, size=(rows, 4)).astype(np.int32),
        "resp_logprobs": rng.standard_normal((rows, 4)).astype(np.float32),
        "saliency": rng.random(rows * 2).astype(np.float16),  # different row count per array
    }
    return f"s{i:03d}", meta, arrays


def write_shard(store: Path, name: str, counts, first: int = 0, seed: int = 0, **kw):
    rng = np.random.default_rng(seed)
    samples = [make_sample(first + j, c, rng) for j, c in enumerate(counts)]
    with ShardWriter(store, name, SPECS, **kw) as w:
        for sid, meta, arrays in samples:
            w.add(sid, meta, arrays)
    return samples, w.info


@pytest.fixture()
def store(tmp_path: Path):
    """One complete shard (small chunks so arrays span several chunks) plus a manifest."""
    samples, _ = write_shard(tmp_path, shard_name(0), ROW_COUNTS, rows_per_chunk=2,
                             chunks_per_file=2)
    write_manifest(tmp_path, {"teacher": {"model_id": "tiny"}, "settings": {"k": 4}})
    return tmp_path, samples


def assert_sample_equal(got, sid, meta, arrays):
    assert got.sample_id == sid
    assert got.meta == meta
    for name, spec in SPECS.items():
        a = got.arrays[name]
        assert a.dtype == np.dtype(spec.dtype)
        np.testing.assert_array_equal(a, arrays[name])


def test_round_trip_varying_rows_including_zero(store):
    path, samples = store
    r = StoreReader(path)
    assert len(r) == len(samples)
    assert r.sample_ids() == [s[0] for s in samples]
    assert r.specs == SPECS
    for sid, meta, arrays in samples:
        assert r.shard_of(sid) == "shard-00000"
        assert_sample_equal(r.get(sid), sid, meta, arrays)
    assert r.get("s001").arrays["resp_ids"].shape == (0, 4)
    assert verify_store(path) == []


def test_read_block_equals_get_and_concatenation(store):
    path, samples = store
    r = StoreReader(path)
    block = r.read_block("shard-00000", 1, 5)
    assert [s.sample_id for s in block] == [s[0] for s in samples[1:5]]
    for got in block:
        single = r.get(got.sample_id)
        assert got.meta == single.meta
        for name in SPECS:
            np.testing.assert_array_equal(got.arrays[name], single.arrays[name])
    for name in SPECS:
        cat = np.concatenate([s[2][name] for s in samples[1:5]])
        np.testing.assert_array_equal(np.concatenate([g.arrays[name] for g in block]), cat)
    assert r.read_block("shard-00000", 2, 2) == []
    with pytest.raises(IndexError):
        r.read_block("shard-00000", 0, len(samples) + 1)


def test_read_block_does_one_read_per_array(store, monkeypatch):
    path, samples = store
    r = StoreReader(path)
    sh = r._shard("shard-00000")
    calls = []
    for name, arr in list(sh.arrays.items()):
        class Counting:
            def __init__(self, inner, name):
                self.inner, self.name = inner, name

            def __getitem__(self, key):
                calls.append(self.name)
                return self.inner[key]
        sh.arrays[name] = Counting(arr, name)
    r.read_block("shard-00000", 0, len(samples))
    assert sorted(calls) == sorted(SPECS)


def test_meta_columns_types_and_round_trip(store):
    path, samples = store
    schema = pq.read_schema(path / "shards/shard-00000/index.parquet")
    assert schema.field("n_tokens").type == pa.int64()
    assert schema.field("score").type == pa.float64()
    assert schema.field("image_hash").type == pa.string()
    assert schema.field("input_ids").type == pa.list_(pa.int64())
    assert schema.field("turns").type == pa.list_(pa.list_(pa.int64()))
    assert schema.field("grids").type == pa.string()  # nested dict -> JSON text
    assert schema.field("resp_ids.start").type == pa.int64()
    r = StoreReader(path)
    assert r.get("s004").meta == samples[4][1]


def test_meta_schema_pins_types(tmp_path):
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), json_field("extra"),
                        ("note", pa.string())])
    with ShardWriter(tmp_path, "a", SPECS, meta_schema=schema) as w:
        w.add("x", {"input_ids": [1, 2], "extra": {"a": [1, {"b": 2}]}, "note": None}, {})
        w.add("y", {"input_ids": [], "extra": None, "note": "n"}, {})
        with pytest.raises(ValueError, match="'y2'.*'input_ids'"):
            w.add("y2", {"input_ids": ["not an int"], "extra": 1, "note": "n"}, {})
    write_manifest(tmp_path, {})
    got = pq.read_schema(tmp_path / "shards/a/index.parquet")
    assert got.field("input_ids").type == pa.list_(pa.int32())
    r = StoreReader(tmp_path)
    assert r.get("x").meta == {"input_ids": [1, 2], "extra": {"a": [1, {"b": 2}]}, "note": None}
    assert r.get("y").meta == {"input_ids": [], "extra": None, "note": "n"}


def test_meta_inconsistent_types_and_keys_refused(tmp_path):
    with pytest.raises(ValueError) as e:
        with ShardWriter(tmp_path, "a", SPECS) as w:
            w.add("x", {"n": 1}, {})
            w.add("y", {"n": "one"}, {})
    assert "'y'" in str(e.value) and "'n'" in str(e.value)
    with pytest.raises(ValueError, match="missing \\['n'\\]"):
        with ShardWriter(tmp_path, "b", SPECS) as w:
            w.add("x", {"n": 1}, {})
            w.add("y", {}, {})


def test_skipped_records(tmp_path):
    with ShardWriter(tmp_path, "a", SPECS) as w:
        w.add("ok", {}, {"saliency": np.ones(3, np.float16)})
        w.add_skipped("bad1", "missing_image", "file not found: x.jpg")
        w.add_skipped("bad2", "over_length", "4100 > 4096 tokens")
        w.add_skipped("bad3", "missing_image", "file not found: y.jpg")
        with pytest.raises(ValueError, match="duplicate sample id 'ok'"):
            w.add_skipped("ok", "no_response", "")
    assert w.info.n_skipped == 3
    assert w.info.skipped_reasons == {"missing_image": 2, "over_length": 1}
    m = write_manifest(tmp_path, {})
    assert m["n_skipped"] == 3 and m["skipped_reasons"] == {"missing_image": 2, "over_length": 1}
    r = StoreReader(tmp_path)
    assert len(r) == 1
    rec = {s.sample_id: s for s in r.skipped()}
    assert rec["bad2"].reason == "over_length" and rec["bad2"].detail == "4100 > 4096 tokens"
    assert rec["bad1"].shard == "a"
    assert verify_store(tmp_path) == []


def test_exception_leaves_partial_shard_then_resume(tmp_path):
    write_shard(tmp_path, "shard-00000", [1, 2])
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "shard-00001", SPECS) as w:
            w.add("z", {}, {"saliency": np.ones(2, np.float16)})
            raise RuntimeError("boom")
    assert (tmp_path / "shards/shard-00001.partial").is_dir()
    assert not (tmp_path / "shards/shard-00001").exists()
    assert list_complete_shards(tmp_path) == ["shard-00000"]
    with pytest.raises(StoreFormatError, match="partial shards"):
        write_manifest(tmp_path, {})
    assert remove_partial_shards(tmp_path) == ["shard-00001"]
    assert not (tmp_path / "shards/shard-00001.partial").exists()
    # Resume: complete shards are skipped (rewriting one is refused), the partial one is redone.
    with pytest.raises(FileExistsError, match="already complete"):
        ShardWriter(tmp_path, "shard-00000", SPECS)
    write_shard(tmp_path, "shard-00001", [3], first=10)
    assert list_complete_shards(tmp_path) == ["shard-00000", "shard-00001"]
    write_manifest(tmp_path, {})
    assert verify_store(tmp_path) == []


def test_reader_refuses_store_without_manifest(tmp_path):
    write_shard(tmp_path, "shard-00000", [1])
    with pytest.raises(StoreFormatError, match="manifest.*incomplete.*not a store"):
        StoreReader(tmp_path)
    problems = verify_store(tmp_path)
    assert len(problems) == 1 and "incomplete" in problems[0]


def test_manifest_written_atomically_with_sorted_keys(store):
    path, _ = store
    text = (path / "manifest.json").read_text()
    m = json.loads(text)
    assert text == json.dumps(m, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert m["format_version"] == FORMAT_VERSION
    assert m["teacher"] == {"model_id": "tiny"} and m["settings"] == {"k": 4}  # passed through
    assert m["arrays"]["resp_ids"] == {"dtype": "int32", "row_shape": [4]}
    assert [p.name for p in path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ValueError, match="format_version"):
        write_manifest(path, {"format_version": "2.0"})


def test_version_mismatch_names_expected_and_found(store):
    path, _ = store
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = "0.9"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreFormatError, match=f"expected format {FORMAT_VERSION}, found 0.9"):
        read_manifest(path)
    with pytest.raises(StoreFormatError, match="expected format 1.0, found 0.9"):
        StoreReader(path)
    assert "found 0.9" in verify_store(path)[0]


def test_edited_manifest_settings_are_refused_naming_the_manifest(store):
    """Settings the manifest carries are checksummed by write_manifest; an edit (a temperature, the
    saliency layers) is refused by read_manifest, the reader and verify. A store written before the
    checksum existed (no settings_sha256) reads as before."""
    path, _ = store
    original = json.loads((path / "manifest.json").read_text())
    assert original["settings_sha256"] == fingerprint({"teacher": {"model_id": "tiny"}, "settings": {"k": 4}})
    edited = {**original, "settings": {"k": 5}}
    (path / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(StoreFormatError, match=f"{path / 'manifest.json'}: .*settings_sha256"):
        read_manifest(path)
    with pytest.raises(StoreFormatError, match="settings_sha256"):
        StoreReader(path)
    assert "settings_sha256" in verify_store(path)[0]
    old_store = {k: v for k, v in edited.items() if k != "settings_sha256"}
    (path / "manifest.json").write_text(json.dumps(old_store))
    assert read_manifest(path)["settings"] == {"k": 5} and verify_store(path) == []
    with pytest.raises(ValueError, match="settings_sha256"):
        write_manifest(path, {"settings_sha256": "0"})


def test_corrupt_chunk_detected_by_verify_and_reader(store):
    path, _ = store
    shard_dir = path / "shards/shard-00000"
    chunk = sorted((shard_dir / "arrays.zarr/resp_logprobs/c").rglob("*"))
    chunk = [p for p in chunk if p.is_file()][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    rel = chunk.relative_to(shard_dir).as_posix()
    problems = verify_store(path)
    assert any("shard-00000" in p and rel in p and "sha256" in p for p in problems), problems
    with pytest.raises(StoreFormatError) as e:
        StoreReader(path, verify_checksums=True)
    assert "shard-00000" in str(e.value) and rel in str(e.value)


def test_damaged_chunk_fails_a_plain_read_naming_shard_and_array(store, tmp_path):
    """Without verify_checksums, a flipped byte inside a compressed chunk still fails the read
    (each chunk carries a CRC32C), with an error naming the shard and the array."""
    path, _ = store
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    reader = StoreReader(copy)
    first = reader.read_block("shard-00000", 0, 2)  # readable before the damage
    assert first and first[0].arrays["resp_logprobs"].size > 0
    chunk = [p for p in sorted((copy / "shards/shard-00000/arrays.zarr/resp_logprobs/c").rglob("*")) if p.is_file()][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a compressed chunk: zstd alone decodes this to wrong values
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match=r"shard 'shard-00000': arrays.zarr/resp_logprobs .*unreadable.*checksum"):
        StoreReader(copy).read_block("shard-00000", 0, 2)


def test_missing_chunk_file_fails_the_read_naming_shard_and_array(store, tmp_path):
    """A deleted chunk file: zarr would read its rows as the fill value (zeros) and the student
    would train on them; the reader refuses, naming the shard, the array and the file, whether the
    file went before the shard was opened or after."""
    path, samples = store
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    opened = StoreReader(copy)
    opened.read_block("shard-00000", 0, 2)  # the shard is open and its rows readable
    chunk = [p for p in sorted((copy / "shards/shard-00000/arrays.zarr/resp_logprobs/c").rglob("*")) if p.is_file()][0]
    rel = chunk.relative_to(copy / "shards/shard-00000").as_posix()
    chunk.unlink()
    assert [p for p in verify_store(copy) if rel in p] == [f"shard 'shard-00000': file {rel} is missing"]  # once
    pattern = rf"shard 'shard-00000': arrays.zarr/resp_logprobs: chunk file {rel} is missing"
    with pytest.raises(StoreFormatError, match=pattern):
        opened.read_block("shard-00000", 0, 2)  # deleted after the open
    with pytest.raises(StoreFormatError, match=pattern):
        StoreReader(copy).get(samples[0][0])  # deleted before the open
    with pytest.raises(StoreFormatError, match=pattern):
        StoreReader(copy).read_block("shard-00000", 0, len(samples))


def test_chunks_never_written_because_all_zero_still_read_as_zeros(tmp_path):
    """Zarr does not write a chunk that is all fill value; the manifest lists no file for it, so the
    reader's check for missing chunk files must not refuse it."""
    specs = {"x": ArraySpec("int32", (2,)), "zero": ArraySpec("float32", ())}
    with ShardWriter(tmp_path, shard_name(0), specs, rows_per_chunk=2, chunks_per_file=2) as w:
        for i in range(4):
            w.add(f"s{i}", {}, {"x": np.full((i + 1, 2), i + 1, np.int32), "zero": np.zeros(i + 1, np.float32)})
    write_manifest(tmp_path, {"teacher": {"model_id": "tiny"}})
    assert not (tmp_path / "shards/shard-00000/arrays.zarr/zero/c").exists()
    block = StoreReader(tmp_path).read_block("shard-00000", 0, 4)
    assert [s.arrays["zero"].tolist() for s in block] == [[0.0] * (i + 1) for i in range(4)]
    assert block[3].arrays["x"].tolist() == [[4, 4]] * 4


def test_index_inconsistency_detected(store):
    path, samples = store
    index = path / "shards/shard-00000/index.parquet"
    t = pq.read_table(index)
    starts = t.column("resp_ids.start").to_pylist()
    starts[3] += 1  # sample s003 now overlaps/gaps its neighbours
    t = t.set_column(t.schema.get_field_index("resp_ids.start"),
                     t.schema.field("resp_ids.start"), pa.array(starts, pa.int64()))
    pq.write_table(t, index)
    problems = verify_store(path)
    assert any("shard-00000" in p and "'resp_ids'" in p and "'s003'" in p and "contiguous" in p
               for p in problems), problems
    assert any("file index.parquet" in p and ("sha256" in p or "bytes" in p) for p in problems)
    with pytest.raises(StoreFormatError, match="resp_ids"):
        StoreReader(path).get("s000")


def test_array_shape_mismatch_with_manifest_detected(store):
    path, _ = store
    m = json.loads((path / "manifest.json").read_text())
    m["arrays"]["resp_ids"]["row_shape"] = [8]
    (path / "manifest.json").write_text(json.dumps(m))
    problems = verify_store(path)
    assert any("resp_ids" in p and "row shape" in p and "shard-00000" in p for p in problems)


def test_duplicate_sample_id_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample id 'a'"):
        with ShardWriter(tmp_path, "s", SPECS) as w:
            w.add("a", {}, {})
            w.add("a", {}, {})


def test_duplicate_sample_id_across_shards_detected(tmp_path):
    write_shard(tmp_path, "shard-00000", [1, 1])
    write_shard(tmp_path, "shard-00001", [1], first=1)  # s001 again
    write_manifest(tmp_path, {})
    problems = verify_store(tmp_path)
    assert any("'s001'" in p and "shard-00000" in p and "shard-00001" in p for p in problems)


@pytest.mark.parametrize("arrays, pattern", [
    ({"resp_ids": np.zeros((2, 4), np.int64)}, "sample 'x', array 'resp_ids'.*int32.*int64"),
    ({"resp_ids": np.zeros((2, 5), np.int32)}, "sample 'x', array 'resp_ids'.*shape"),
    ({"saliency": np.zeros((2, 1), np.float16)}, "sample 'x', array 'saliency'.*shape"),
    ({"unknown": np.zeros(2, np.float16)}, "sample 'x'.*'unknown' is not declared"),
    ({"resp_ids": [[1, 2, 3, 4]]}, "sample 'x', array 'resp_ids'.*numpy"),
])
def test_wrong_dtype_or_shape_refused(tmp_path, arrays, pattern):
    w = ShardWriter(tmp_path, "s", SPECS)
    with pytest.raises((ValueError, TypeError), match=pattern):
        w.add("x", {}, arrays)
    w.add("x", {}, {})  # nothing of the refused sample was recorded
    assert w.close().n_samples == 1


def test_two_writers_then_manifest_aggregates(tmp_path):
    s0, info0 = write_shard(tmp_path, shard_name(0), [2, 3], seed=1)
    with ShardWriter(tmp_path, shard_name(1), SPECS) as w:
        rng = np.random.default_rng(2)
        for i, c in enumerate([4, 0, 1]):
            w.add(*make_sample(100 + i, c, rng))
        w.add_skipped("s999", "corrupt_image", "truncated JPEG")
    m = write_manifest(tmp_path, {"dataset": fingerprint({"files": ["a.json"]})})
    assert m["n_samples"] == 5 and m["n_skipped"] == 1
    assert [s["name"] for s in m["shards"]] == ["shard-00000", "shard-00001"]
    assert [s["n_samples"] for s in m["shards"]] == [2, 3]
    assert m["shards"][0]["rows"] == {"resp_ids": 5, "resp_logprobs": 5, "saliency": 10}
    assert m["shards"][0]["files"] == info0.files
    assert m["shards"][0]["bytes"] == info0.bytes > 0
    sj = tmp_path / "shards/shard-00001/shard.json"
    assert m["shards"][1]["shard_json"]["sha256"] == file_sha256(sj)
    r = StoreReader(tmp_path, verify_checksums=True)
    assert r.shard_sizes() == {"shard-00000": 2, "shard-00001": 3}
    assert r.shard_of("s101") == "shard-00001"
    assert verify_store(tmp_path) == []


def test_file_count_stays_small_with_sharding_codec(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, "s", {"x": ArraySpec("float32", (3,))}, rows_per_chunk=4,
                     chunks_per_file=64) as w:
        for i in range(50):
            w.add(f"x{i}", {}, {"x": rng.random((5, 3)).astype(np.float32)})
    arr_dir = tmp_path / "shards/s/arrays.zarr/x"
    files = [p for p in arr_dir.rglob("*") if p.is_file()]
    assert 250 // 4 > 60  # many inner chunks ...
    assert len(files) < 10, files  # ... in few files
    all_files = [p for p in (tmp_path / "shards/s").rglob("*") if p.is_file()]
    assert len(all_files) < 10
    write_manifest(tmp_path, {})
    r = StoreReader(tmp_path)
    assert r.read_block("s", 0, 50)[49].arrays["x"].shape == (5, 3)


def test_large_shard_flushes_aligned_and_round_trips(tmp_path):
    """More rows than one chunk file: several whole-file flushes plus a partial tail."""
    rng = np.random.default_rng(3)
    data = {}
    with ShardWriter(tmp_path, "s", {"x": ArraySpec("int16", (2,))}, rows_per_chunk=3,
                     chunks_per_file=2) as w:
        for i in range(40):
            a = rng.integers(-100, 100, size=(int(rng.integers(0, 9)), 2)).astype(np.int16)
            data[f"x{i}"] = a
            w.add(f"x{i}", {"i": i}, {"x": a})
    write_manifest(tmp_path, {})
    r = StoreReader(tmp_path)
    for sid, a in data.items():
        np.testing.assert_array_equal(r.get(sid).arrays["x"], a)
    assert verify_store(tmp_path) == []


def test_fingerprint_is_canonical():
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint([])) == 64


def test_array_spec_json_round_trip():
    s = ArraySpec("f2", [3, 4])
    assert s == ArraySpec("float16", (3, 4))
    assert ArraySpec.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(ValueError, match="dtype"):
        ArraySpec("object")
    with pytest.raises(ValueError, match="row_shape"):
        ArraySpec("int32", (0,))


class _CountingArray:
    """A zarr array that records the row ranges read from it."""

    def __init__(self, inner, reads: list):
        self.inner, self.reads = inner, reads

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.inner[key]


@pytest.mark.parametrize("cache_bytes", [24, 1 << 20])  # a few 2-row chunks (evicting) / all of them
def test_chunk_cache_reads_equal_plain_reads(store, cache_bytes):
    path, samples = store
    plain, cached = StoreReader(path), StoreReader(path, cache_bytes=cache_bytes)
    n = len(samples)
    for start in range(n):
        for stop in range(start + 1, n + 1):
            for a, b in zip(plain.read_block("shard-00000", start, stop), cached.read_block("shard-00000", start, stop)):
                assert a.sample_id == b.sample_id and a.meta == b.meta
                for name in SPECS:
                    assert b.arrays[name].dtype == a.arrays[name].dtype
                    np.testing.assert_array_equal(b.arrays[name], a.arrays[name])
            assert 0 < cached._cache.bytes <= cache_bytes


def test_chunk_cache_decodes_each_chunk_once(store):
    path, samples = store
    r = StoreReader(path, cache_bytes=1 << 20)
    sh = r._shard("shard-00000")
    reads = {name: [] for name in SPECS}
    for name in SPECS:
        sh.arrays[name] = _CountingArray(sh.arrays[name], reads[name])
    for _ in range(2):  # a second pass over the shard reads nothing
        for start in range(len(samples)):
            r.read_block("shard-00000", start, start + 1)
    for name in SPECS:
        rows = int(sh.arrays[name].shape[0])
        chunks = [(c, min(c + 2, rows)) for c in range(0, rows, 2)]  # rows_per_chunk=2 in the fixture
        assert sorted(set(reads[name])) == chunks and len(reads[name]) == len(chunks), name
    (one,) = r.read_block("shard-00000", 3, 4)  # s003: one row, inside one chunk
    assert not one.arrays["resp_ids"].flags.writeable  # a view of a cached chunk: read-only


def test_lru_bytes_keeps_the_most_recent_within_its_bound():
    from schemas.reader import LRUBytes

    c = LRUBytes(10)
    c.put("a", 1, 4)
    c.put("b", 2, 4)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3, 4)  # 12 > 10: drops b, the least recent
    assert (c.get("a"), c.get("b"), c.get("c")) == (1, None, 3) and c.bytes == 8
    c.put("big", 4, 11)  # larger than the whole bound: not kept, nothing dropped
    assert c.get("big") is None and len(c) == 2
    zero = LRUBytes(0)
    zero.put("a", 1, 1)
    assert zero.get("a") is None
    with pytest.raises(ValueError, match=">= 0"):
        LRUBytes(-1)

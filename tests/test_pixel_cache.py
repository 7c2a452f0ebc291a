"""stage2_student.data.pixel_cache on its own: exact round trip, commit by index line, damage, foreign
directories, the size bound, several writing processes. (With StoreDataset: test_stage2_data.py.)"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp

import pytest
import torch

from stage2_student.data.pixel_cache import CONFIG_FILE, DATA_SUFFIX, INDEX_SUFFIX, PixelCache, PixelCacheError


def key(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def tensors(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    pixels = torch.randn(3, 5, 7, generator=g)
    pixels[0, 0, :4] = torch.tensor([float("nan"), -0.0, 1e-45, float("inf")])  # NaN, -0, subnormal, inf
    return {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 6 + i]])}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(-1).view(torch.uint8), b[k].contiguous().view(-1).view(torch.uint8))
        for k in a
    )


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def files(cache: PixelCache, suffix: str) -> list:
    return sorted(cache.dir.glob(f"*{suffix}"))


def test_round_trip_is_bit_exact_for_any_dtype(processor, tmp_path):
    cache = PixelCache(tmp_path, processor)
    odd = {
        "half": torch.randn(4, 3).half(),
        "bf16": torch.randn(2, 9).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 5),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }
    for i, t in enumerate([tensors(0), tensors(1), odd]):
        assert cache.put(key(i), t, {"n_tokens": i, "grid": [1, i]})
    reopened = PixelCache(tmp_path, processor)
    for i, t in enumerate([tensors(0), tensors(1), odd]):
        got, meta = reopened.get(key(i))
        assert same_bits(got, t) and meta == {"n_tokens": i, "grid": [1, i]}
    assert reopened.get(key(9)) is None


def test_a_line_without_its_newline_is_not_committed(processor, tmp_path, caplog):
    cache = PixelCache(tmp_path, processor)
    cache.put(key(0), tensors(0), {})
    cache.put(key(1), tensors(1), {})
    index, = files(cache, INDEX_SUFFIX)
    text = index.read_text()
    index.write_text(text[: len(text) - 20])  # a crash in the middle of writing the second line
    with caplog.at_level("WARNING", logger="stage2.data"):
        reopened = PixelCache(tmp_path, processor)
    assert warnings(caplog) == []  # an uncommitted entry is expected after a crash: no warning
    assert same_bits(reopened.get(key(0))[0], tensors(0)) and reopened.get(key(1)) is None
    reopened.put(key(1), tensors(1), {})  # rewritten, in this process's own segment
    assert same_bits(PixelCache(tmp_path, processor).get(key(1))[0], tensors(1))


def test_a_malformed_line_is_skipped_with_a_warning_naming_the_file_and_line(processor, tmp_path, caplog):
    cache = PixelCache(tmp_path, processor)
    for i in range(3):
        cache.put(key(i), tensors(i), {})
    index, = files(cache, INDEX_SUFFIX)
    lines = index.read_text().splitlines()
    lines[1] = lines[1].replace('"float32"', '"complex99"')
    index.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="stage2.data"):
        reopened = PixelCache(tmp_path, processor)
    assert f"pixel cache {index}: 1 line(s) are not valid entries and are ignored (line 2: " in caplog.text
    assert reopened.get(key(1)) is None
    assert same_bits(reopened.get(key(0))[0], tensors(0)) and same_bits(reopened.get(key(2))[0], tensors(2))


def test_an_entry_whose_description_was_altered_fails_its_crc(processor, tmp_path, caplog):
    cache = PixelCache(tmp_path, processor)
    cache.put(key(0), tensors(0), {"n_tokens": 16})
    index, = files(cache, INDEX_SUFFIX)
    index.write_text(index.read_text().replace('"n_tokens":16', '"n_tokens":17'))
    data, = files(cache, DATA_SUFFIX)
    with caplog.at_level("WARNING", logger="stage2.data"):
        assert PixelCache(tmp_path, processor).get(key(0)) is None
    assert f"pixel cache {data}: entry for image {key(0)[:12]}… fails its crc32" in caplog.text


def test_a_later_entry_replaces_an_earlier_one(processor, tmp_path):
    PixelCache(tmp_path, processor).put(key(0), tensors(0), {"v": 1})
    PixelCache(tmp_path, processor).put(key(0), tensors(5), {"v": 2})  # another process, a newer segment
    got, meta = PixelCache(tmp_path, processor).get(key(0))
    assert meta == {"v": 2} and same_bits(got, tensors(5))


def test_a_directory_of_another_processor_config_is_refused_naming_the_file(processor, tmp_path):
    cache = PixelCache(tmp_path, processor)
    config = cache.dir / CONFIG_FILE
    recorded = json.loads(config.read_text())
    assert recorded["fingerprint"] == cache.dir.name and recorded["settings"]["versions"]["transformers"]
    config.write_text(json.dumps({**recorded, "fingerprint": "0" * 64}))  # as if copied from elsewhere
    expected = rf"pixel cache config {config} was written for processor fingerprint 000000000000…"
    with pytest.raises(PixelCacheError, match=expected):
        PixelCache(tmp_path, processor)
    config.write_text("{not json")
    with pytest.raises(PixelCacheError, match=rf"pixel cache config {config} cannot be read"):
        PixelCache(tmp_path, processor)


def test_the_size_bound_stops_writing(processor, tmp_path, caplog):
    one = PixelCache(tmp_path / "probe", processor)
    one.put(key(0), tensors(0), {})
    entry_bytes = one.stats()[1]
    with caplog.at_level("INFO", logger="stage2.data"):
        cache = PixelCache(tmp_path, processor, max_bytes=3 * entry_bytes)
        written = [cache.put(key(i), tensors(i), {}) for i in range(5)]
    assert written == [True, True, True, False, False]
    assert cache.stats()[1] == 3 * entry_bytes and cache.get(key(3)) is None
    assert caplog.text.count("reached its bound") == 1


def _write_range(cache: PixelCache, first: int, n: int) -> None:
    for i in range(first, first + n):
        assert cache.put(key(i), tensors(i), {"i": i})


def test_several_processes_write_at_once_and_a_reader_sees_them_on_a_miss(processor, tmp_path, caplog):
    reader = PixelCache(tmp_path, processor)  # opened before anything is written
    parent = PixelCache(tmp_path, processor)
    parent.put(key(99), tensors(99), {"i": 99})  # a writer open before the fork, as in a DataLoader's parent
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_range, args=(parent, 20 * w, 20)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    parent.put(key(98), tensors(98), {"i": 98})  # the parent goes on writing its own segment
    assert len(files(reader, DATA_SUFFIX)) == 4  # one segment per writing process
    with caplog.at_level("WARNING", logger="stage2.data"):
        for i in [*range(60), 98, 99]:
            got, meta = reader.get(key(i))
            assert meta == {"i": i} and same_bits(got, tensors(i))
    assert warnings(caplog) == []

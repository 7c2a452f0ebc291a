"""Store codecs (schemas/codecs.py): round trips of every codec on random rows and edge cases, the
fidelity measure against a direct computation, and the compact profile end to end (dump, verify,
damage, an unknown codec, the exact format unchanged, Stage 2 batches against the exact store's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corrupt_chunk
from test_dump import dump_config, make_dataset

from pipeline.modeling.sparse import tail_mass
from pipeline.tools.tiny import build_tiny_vlm, save_tiny_vlm
from schemas import StoreFormatError, StoreReader
from schemas.codecs import (
    CodecError,
    StoreCodecs,
    TopkCodec,
    completion_kl,
    id_bits,
    pack_bits,
    unpack_bits,
    unpack_runs,
)
from schemas.manifest import _settings_sha256, read_manifest
from schemas.signal_checks import verify
from schemas.signals import signal_bytes
from stage1_teacher.dump import run
from stage2_student.data import StoreDataset

V = 151_936


def random_rows(rng, rows: int, k: int, vocab: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows of random softmax distributions over ``vocab`` tokens (float32 log-probs)."""
    logits = rng.standard_normal((rows, vocab)) * scale
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :k]
    return ids.astype(np.int32), np.take_along_axis(lp, ids, 1).astype(np.float32)


def codec(k=8, vocab=V, **kw) -> TopkCodec:
    return TopkCodec(ids="x_ids", logprobs="x_logprobs", prefix="x_topk", k=k, vocab_size=vocab, **kw)


def round_trip(c: TopkCodec, ids, lps):
    """(the stored parts, the decoded arrays) of one sample's rows."""
    stored = c.encode({"x_ids": ids, "x_logprobs": lps})
    assert list(stored) == ["x_topk"] and stored["x_topk"].dtype == np.uint8
    return c.parse(stored["x_topk"]), c.decode(stored)


def exact_tail(ids, lps) -> np.ndarray:
    p = np.where(ids >= 0, np.exp(lps.astype(np.float64)), 0.0)
    return np.maximum(1 - p.sum(axis=1), 0)


# --------------------------------------------------------------------------------------------------
# the pieces


@pytest.mark.parametrize("count", [37, 9000])
@pytest.mark.parametrize("width", [1, 9, 18, 31])
def test_bit_packing_round_trips_and_refuses_a_wrong_length(width, count):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2**width, size=count)
    packed = pack_bits(values, width)
    assert len(packed) == math.ceil(count * width / 8)
    assert np.array_equal(unpack_bits(packed, width, count), values)
    # an independent unpacking: the integer the little-endian byte string spells
    big = int.from_bytes(packed.tobytes(), "little")
    assert [(big >> (width * i)) & ((1 << width) - 1) for i in range(count)] == values.tolist()
    with pytest.raises(CodecError, match=f"bytes for {count} ids"):
        unpack_bits(packed[:-1], width, count)
    assert id_bits(V) == 18 and id_bits(512) == 9 and id_bits(1) == 1


def reference_kl(e_ids, e_lp, d_ids, d_lp, vocab):
    """completion_kl written out token by token over the whole vocabulary (small vocab only)."""
    out = []
    for ei, el, di, dl in zip(e_ids, e_lp, d_ids, d_lp):
        p_full = np.zeros(vocab)
        named = {int(i): math.exp(float(x)) for i, x in zip(ei, el) if i >= 0}
        rest = [t for t in range(vocab) if t not in named]
        for t, v in named.items():
            p_full[t] = v
        q_full = np.zeros(vocab)
        dn = {int(i): math.exp(float(x)) for i, x in zip(di, dl) if i >= 0}
        fill = max(1 - sum(dn.values()), 0) / (vocab - len(dn))
        for t in range(vocab):
            q_full[t] = dn.get(t, fill)
        m = max(1 - sum(named.values()), 0)
        kl = sum(v * math.log(v / q_full[t]) for t, v in named.items() if v > 0)
        q_tail = sum(q_full[t] for t in rest)
        kl += m * math.log(m / q_tail) if m > 0 else 0.0
        out.append(kl)
    return np.array(out)


def test_completion_kl_equals_the_token_by_token_sum():
    rng = np.random.default_rng(0)
    vocab = 40
    ids, lps = random_rows(rng, 12, 8, vocab, 2.0)
    c = codec(k=8, vocab=vocab, max_kl=0.05)
    _, dec = round_trip(c, ids, lps)
    got = completion_kl(ids, lps, dec["x_ids"], dec["x_logprobs"], vocab)
    assert np.allclose(got, reference_kl(ids, lps, dec["x_ids"], dec["x_logprobs"], vocab), atol=1e-9)
    assert (got > 0).all()  # quantised and truncated: never equal
    assert np.allclose(completion_kl(ids, lps, ids, lps, vocab), 0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("max_kl", [0.0, 1e-3, 1e-2])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_topk_codec_round_trip_random_rows(max_kl, scale):
    rng = np.random.default_rng(int(scale * 10 + max_kl * 1e4))
    ids, lps = random_rows(rng, 40, 16, 5000, scale)
    c = codec(k=16, vocab=5000, max_kl=max_kl)
    stored, dec = round_trip(c, ids, lps)
    n = stored["n"].astype(int)
    d_ids, d_lp = dec["x_ids"], dec["x_logprobs"]
    assert d_ids.shape == ids.shape and d_ids.dtype == np.int32 and d_lp.dtype == np.float32
    for r in range(len(ids)):
        # the row's most probable n ids, in rank order, then padding
        assert np.array_equal(d_ids[r, : n[r]], ids[r, : n[r]]) and (d_ids[r, n[r]:] == -1).all()
        assert np.isneginf(d_lp[r, n[r]:]).all()
        # each kept log-prob within the codec's bound of the exact one
        assert np.abs(d_lp[r, : n[r]] - lps[r, : n[r]]).max() <= c.logprob_error + 1e-6
    if max_kl == 0:
        assert (n == 16).all()
    # the stored tail is the exact mass outside the kept ids; the decoded log-probs carry the rest
    kept = np.arange(16)[None, :] < n[:, None]
    tail = 1 - np.where(kept, np.exp(lps.astype(np.float64)), 0).sum(axis=1)
    assert np.allclose(stored["tail"], tail, rtol=1e-6, atol=1e-9)
    derived = tail_mass(torch.from_numpy(d_lp).double()).numpy()
    assert np.allclose(derived, tail, rtol=1e-5, atol=1e-6)
    # the truncation rule keeps every row within max_kl of the exact row (when truncating)
    kl = completion_kl(ids, lps, d_ids, d_lp, 5000)
    if max_kl:
        assert (kl[n < 16] <= max_kl * (1 + 1e-6)).all()
    if max_kl and scale > 1:  # peaked rows: some ids go
        assert (n < 16).any()


def test_topk_codec_edge_cases():
    k = 6
    c = codec(k=k, max_kl=1e-3)
    rows_ids = np.array([
        [7, 1, 2, 3, 4, 5],  # all mass in top-1 (others e^-60)
        [10, 11, 12, 13, 14, 15],  # tail ~ 1e-9
        [20, 21, 22, -1, -1, -1],  # padding slots
        [-1, -1, -1, -1, -1, -1],  # an empty row
    ], dtype=np.int32)
    top1 = np.array([0.0, -60, -61, -62, -63, -64])
    p = np.array([0.5, 0.3, 0.15, 0.04, 0.01 - 1e-9 - 1e-3, 1e-3])
    rows_lp = np.stack([top1, np.log(p), np.log([0.6, 0.3, 0.05, 1, 1, 1]), np.zeros(k)]).astype(np.float32)
    rows_lp[2, 3:] = -np.inf
    stored, dec = round_trip(c, rows_ids, rows_lp)
    n = stored["n"].tolist()
    assert n[0] == 1 and dec["x_ids"][0].tolist() == [7, -1, -1, -1, -1, -1]
    assert dec["x_logprobs"][0, 0] == pytest.approx(0.0, abs=1e-7)
    assert n[1] == 6  # 1e-9 of tail: dropping even the 1e-3 id costs more than max_kl
    assert stored["tail"][1] == pytest.approx(exact_tail(rows_ids, rows_lp)[1], rel=1e-6)
    assert 0 < stored["tail"][1] < 1e-7
    assert n[2] <= 3 and (dec["x_ids"][2, 3:] == -1).all()
    assert n[3] == 0 and (dec["x_ids"][3] == -1).all() and np.isneginf(dec["x_logprobs"][3]).all()
    assert stored["tail"][3] == 1.0
    # no rows at all
    stored, dec = round_trip(c, np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
    assert all(len(a) == 0 for a in stored.values()) and dec["x_ids"].shape == (0, k)


def test_topk_codec_refuses_what_it_cannot_decode():
    c = codec(k=4, vocab=1000)
    ids, lps = random_rows(np.random.default_rng(1), 5, 4, 1000, 2.0)
    good = c.encode({"x_ids": ids, "x_logprobs": lps})["x_topk"]
    rows = 5

    def at(offset, value, dtype=np.uint8):
        bad = good.copy()
        bad[offset : offset + np.dtype(dtype).itemsize] = np.array([value], dtype=dtype).view(np.uint8)
        return bad

    cases = [
        (good[:-1], "expected"),  # a byte short
        (np.concatenate([good, [0]]).astype(np.uint8), "expected"),  # a byte more
        (good[:3], "shorter than the row count"),
        (at(0, 1000, "<u4"), "for 1000 rows"),
        (at(4, 9), "more than k = 4"),  # row 0 keeps 9 ids
    ]
    tail = good.copy()
    tail[4 + rows : 4 + rows + 4 * rows] = _planes_of(np.full(rows, 2.0, "<f4"))
    cases.append((tail, r"outside \[0, 1\]"))
    ones = good.copy()
    ones[-math.ceil(20 * id_bits(1000) / 8):] = 0xFF  # every id 1023
    cases.append((ones, "outside the vocabulary"))
    for bad, msg in cases:
        with pytest.raises(CodecError, match=f"array x_topk .*{msg}"):
            c.decode({"x_topk": bad})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        c.encode({"x_ids": ids + 1000, "x_logprobs": lps})


def test_unpack_runs_reads_runs_packed_one_by_one():
    rng = np.random.default_rng(3)
    for width in (1, 9, 18, 31, 57):
        runs = [rng.integers(0, 2**width, size=c, dtype=np.uint64) for c in (5, 0, 1, 64, 3)]
        packed = [pack_bits(r, width) for r in runs]
        buf = np.concatenate([*packed, np.zeros(8, np.uint8)])
        starts = np.cumsum([0, *map(len, packed)])[:-1]
        got = unpack_runs(buf, starts, [len(r) for r in runs], width)
        assert got.tolist() == np.concatenate(runs).astype(np.int64).tolist(), width
    with pytest.raises(ValueError, match="58 bits"):
        unpack_runs(buf, [0], [1], 58)
    with pytest.raises(ValueError, match="vocab_size"):
        codec(vocab=2**31 + 1)


def test_samples_decoded_together_equal_each_decoded_alone():
    """A block of samples (rows of every shape, a sample without rows, one with no bytes) decodes
    to what each sample decodes to alone, and a bad sample in the block is named by position."""
    c = codec(k=16, vocab=5000, max_kl=1e-3)
    rng = np.random.default_rng(4)
    bufs, exact = [], []
    for rows, scale in [(7, 1.0), (0, 1.0), (1, 8.0), (40, 8.0), (3, 30.0)]:
        ids, lps = random_rows(rng, rows, 16, 5000, scale)
        bufs.append(c.encode({"x_ids": ids, "x_logprobs": lps})["x_topk"])
        exact.append(ids)
    bufs.insert(2, np.zeros(0, np.uint8))  # a sample written without rows of this signal
    exact.insert(2, np.zeros((0, 16), np.int32))
    together = c.decode_many(bufs)
    assert len(together) == len(bufs)
    for buf, ids, d in zip(bufs, exact, together):
        alone = c.decode({"x_topk": buf})
        assert np.array_equal(d["x_ids"], alone["x_ids"]) and np.array_equal(d["x_logprobs"], alone["x_logprobs"])
        kept = d["x_ids"] >= 0
        assert d["x_ids"].shape == ids.shape and np.array_equal(d["x_ids"][kept], ids[kept])
    for bad_at, edit, msg in [(3, lambda b: b[:-1], "expected"), (0, lambda b: b[:3], "shorter than the row count"),
                              (5, lambda b: np.concatenate([b, [7]]).astype(np.uint8), "expected")]:
        damaged = list(bufs)
        damaged[bad_at] = edit(bufs[bad_at])
        with pytest.raises(CodecError, match=f"array x_topk .*{msg}") as e:
            c.decode_many(damaged)
        assert e.value.sample == bad_at


def test_damaged_bytes_in_a_block_decode_or_fail_as_codec_errors():
    """Random byte flips and cuts anywhere in a block: decoding either succeeds or raises a
    CodecError naming a sample of the block, never another exception (no read outside a sample)."""
    c = codec(k=8, vocab=5000, max_kl=1e-3)
    rng = np.random.default_rng(11)
    bufs = [c.encode(dict(zip(("x_ids", "x_logprobs"), random_rows(rng, rows, 8, 5000, 6.0))))["x_topk"]
            for rows in (3, 0, 9, 1)]
    failed = 0
    for _ in range(400):
        damaged = [b.copy() for b in bufs]
        j = int(rng.integers(len(bufs)))
        if rng.random() < 0.2:
            damaged[j] = damaged[j][: int(rng.integers(len(damaged[j]) + 1))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                damaged[j][int(rng.integers(len(damaged[j])))] = rng.integers(256)
        try:
            c.decode_many(damaged)
        except CodecError as e:
            failed += 1
            assert e.sample == j and "array x_topk" in str(e)
    assert failed > 100  # most damage is caught (a flipped log-prob code or tail byte may still decode)


def test_reader_names_the_sample_that_does_not_decode(stores, monkeypatch):
    r = StoreReader(stores["compact"])
    real = TopkCodec.decode_many

    def second_fails(self, bufs):
        real(self, bufs)
        raise CodecError("bad bytes", sample=1)

    monkeypatch.setattr(TopkCodec, "decode_many", second_fails)
    second = StoreReader(stores["exact"]).read_block("shard-00000", 1, 2)[0].sample_id
    with pytest.raises(StoreFormatError, match=rf"shard 'shard-00000': sample '{second}': .*bad bytes"):
        r.read_block("shard-00000", 0, 3)


def _planes_of(x: np.ndarray) -> np.ndarray:
    """Byte planes written independently of the codec: byte j of every value, for j = 0, 1, 2, 3."""
    raw = x.tobytes()
    return np.frombuffer(bytes(raw[i * x.itemsize + j] for j in range(x.itemsize) for i in range(len(x))), np.uint8)


def test_store_codecs_json_and_unknown_codec():
    c = StoreCodecs([codec(k=8)])
    again = StoreCodecs.from_json(json.loads(json.dumps(c.to_json())))
    assert again.to_json() == c.to_json()
    assert StoreCodecs.from_json(None).to_json() == []
    with pytest.raises(StoreFormatError, match="codec 'zfp-v9'.*cannot decode"):
        StoreCodecs.from_json([{"codec": "zfp-v9", "arrays": ["x_ids"]}])


# --------------------------------------------------------------------------------------------------
# the compact profile in a real store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One llava teacher's dump of the same data twice: exact and compact."""
    root = tmp_path_factory.mktemp("codecs")
    teacher = save_tiny_vlm(root / "teacher", "llava", "teacher")
    data = make_dataset(root / "data", n=8)
    out = {}
    for profile in ("exact", "compact"):
        out[profile] = root / profile
        run(dump_config(teacher, data, out[profile], **{"signals.codec.profile": profile, "signals.codec.max_kl": 1e-3}))
    return out


def test_exact_profile_writes_the_format_of_old_stores(stores):
    m = read_manifest(stores["exact"])
    assert "codecs" not in m and "resp_ids" in m["arrays"]
    # a store written before codecs existed (no `codecs` entry anywhere) reads as before
    r = StoreReader(stores["exact"])
    assert r.specs == r.stored_specs and not r.codecs


def test_compact_store_decodes_to_the_exact_stores_arrays(stores):
    m = read_manifest(stores["compact"])
    assert [c["codec"] for c in m["codecs"]] == ["topk-packed-v1"] * 3
    assert "resp_ids" not in m["arrays"] and m["arrays"]["resp_topk"] == {"dtype": "uint8", "row_shape": []}
    exact, compact = StoreReader(stores["exact"]), StoreReader(stores["compact"])
    assert compact.specs == exact.specs
    vocab = m.vocab_size
    assert verify(stores["compact"]) == []
    for sid in exact.sample_ids():
        a, b = exact.get(sid).arrays, compact.get(sid).arrays
        assert a.keys() == b.keys()
        for name in a:
            if not name.endswith(("_ids", "_logprobs")) or name.startswith("resp_sample"):
                assert np.array_equal(a[name], b[name]), (sid, name)  # stored as they are
        for x in ("resp", "vis", "tpa"):
            kl = completion_kl(a[f"{x}_ids"], a[f"{x}_logprobs"], b[f"{x}_ids"], b[f"{x}_logprobs"], vocab)
            assert (kl <= 1e-3 * (1 + 1e-6)).all(), (sid, x, kl.max())
    bytes_exact = signal_bytes(stores["exact"])
    bytes_compact = signal_bytes(stores["compact"])
    for g in ("response_topk", "visual_topk", "transitions"):
        assert bytes_compact[g]["bytes"] < bytes_exact[g]["bytes"], g


def test_damaged_compact_chunk_names_shard_and_array(stores, tmp_path):
    import shutil

    store = tmp_path / "damaged"
    shutil.copytree(stores["compact"], store)
    corrupt_chunk(store, "shard-00000", "resp_topk")
    r = StoreReader(store)
    with pytest.raises(StoreFormatError, match=r"shard 'shard-00000'.*arrays.zarr/resp_topk rows"):
        r.read_block("shard-00000", 0, 4)
    with pytest.raises(StoreFormatError, match="shard-00000"):
        StoreReader(store, verify_checksums=True)


def test_unknown_codec_in_a_store_is_refused_by_name(stores, tmp_path):
    import shutil

    store = tmp_path / "unknown"
    shutil.copytree(stores["compact"], store)
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    doc["codecs"][0]["codec"] = "topk-packed-v9"
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match="edited"):  # the codecs are hashed with the settings
        StoreReader(store)
    # as a newer version would write it: its settings checksum covers the codec it names
    doc["settings_sha256"] = _settings_sha256(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match="codec 'topk-packed-v9'.*cannot decode"):
        StoreReader(store)


def test_compact_store_feeds_stage2_batches_like_the_exact_one(stores):
    _, processor = build_tiny_vlm("llava", "student", seed=1)
    kw = {"batch_size": 3, "seed": 5, "block_size": 2, "window_blocks": 2, "temperature": 1.0}
    exact = list(StoreDataset(stores["exact"], processor, **kw))
    compact = list(StoreDataset(stores["compact"], processor, **kw))
    assert len(exact) == len(compact) > 0
    step = read_manifest(stores["compact"]).codecs.codecs[0].logprob_error
    for a, b in zip(exact, compact):
        assert a.sample_ids == b.sample_ids and torch.equal(a.labels, b.labels)
        for group in ("kd", "iva", "tpa"):
            ga, gb = getattr(a, group), getattr(b, group)
            assert ga.ids.shape == gb.ids.shape
            kept = gb.ids >= 0
            assert torch.equal(gb.ids[kept], ga.ids[kept])  # the kept ids are the exact row's first ones
            assert (ga.logprobs[kept] - gb.logprobs[kept]).abs().max() <= step + 1e-5
            # the tail the losses derive from the decoded rows is the exact mass outside the kept ids
            exact_tail = 1 - torch.where(kept, ga.logprobs.double().exp(), torch.zeros(())).sum(-1)
            assert torch.allclose(tail_mass(gb.logprobs.double()), exact_tail, atol=2e-6)


def test_recoding_the_exact_store_writes_what_a_compact_dump_writes(stores, tmp_path):
    from stage1_teacher.config import CodecConfig
    from stage1_teacher.recode import recode

    m = recode(stores["exact"], tmp_path / "recoded", CodecConfig(profile="compact", max_kl=1e-3))
    dumped = read_manifest(stores["compact"])
    assert m["codecs"] == dumped["codecs"] and m.signals["codec"] == dumped.signals["codec"]
    for a, b in zip(m.shards, dumped.shards):
        topk = {rel: f["sha256"] for rel, f in a["files"].items() if "_topk/" in rel}
        assert topk and topk == {rel: f["sha256"] for rel, f in b["files"].items() if "_topk/" in rel}
    assert verify(tmp_path / "recoded") == []
    # and back to exact: the decoded arrays are what the compact store decodes to
    back = recode(tmp_path / "recoded", tmp_path / "back", CodecConfig(profile="exact"))
    assert "codecs" not in back
    r1, r2 = StoreReader(tmp_path / "recoded"), StoreReader(tmp_path / "back")
    for sid in r1.sample_ids():
        a, b = r1.get(sid).arrays, r2.get(sid).arrays
        assert all(np.array_equal(a[k], b[k]) for k in a), sid


def test_cached_reads_of_a_compact_store_decode_once(stores, monkeypatch):
    plain = StoreReader(stores["compact"])
    cached = StoreReader(stores["compact"], cache_bytes=1 << 26)
    n = plain.shard_sizes()["shard-00000"]
    first = cached.read_block("shard-00000", 0, n)
    decodes = []
    real = StoreCodecs.decode_many
    monkeypatch.setattr(StoreCodecs, "decode_many", lambda self, arrays: decodes.append(1) or real(self, arrays))
    again = cached.read_block("shard-00000", 0, n)
    assert decodes == []  # every sample's decoded arrays came from the cache
    for a, b, c in zip(plain.read_block("shard-00000", 0, n), first, again):
        for name in a.arrays:
            assert np.array_equal(a.arrays[name], b.arrays[name]) and np.array_equal(a.arrays[name], c.arrays[name])
    assert not again[0].arrays["resp_logprobs"].flags.writeable


@pytest.mark.parametrize("max_dropped", [1e-3, 3e-2])
def test_coverage_rule_keeps_the_fewest_ids_dropping_at_most_that_mass(max_dropped):
    ids, lps = random_rows(np.random.default_rng(7), 30, 16, 5000, 6.0)
    stored, dec = round_trip(codec(k=16, vocab=5000, max_dropped=max_dropped), ids, lps)
    p = np.exp(lps.astype(np.float64))
    n = stored["n"].astype(int)
    for r in range(len(ids)):
        assert p[r, n[r]:].sum() <= max_dropped  # what it dropped
        assert n[r] == 0 or p[r, n[r] - 1:].sum() > max_dropped  # one id fewer would drop too much
    assert (n < 16).any() and (n > 0).all()
    both, _ = round_trip(codec(k=16, vocab=5000, max_dropped=max_dropped, max_kl=1e-3), ids, lps)
    kl_only, _ = round_trip(codec(k=16, vocab=5000, max_kl=1e-3), ids, lps)
    assert np.array_equal(both["n"], np.maximum(n, kl_only["n"]))  # both rules on: each must hold


def test_a_store_begun_before_profiles_resumes_as_exact_and_refuses_compact(stores, tmp_path):
    import shutil

    from stage1_teacher.dump import StoreMismatchError

    store = tmp_path / "old"
    shutil.copytree(stores["exact"], store)
    settings = json.loads((store / "dump.json").read_text())
    del settings["signals"]["codec"]  # what dump.json held before signals.codec existed
    (store / "dump.json").write_text(json.dumps(settings))
    teacher, data = settings["teacher"]["path"], settings["dataset"]["path"]
    assert run(dump_config(Path(teacher), Path(data), store)).n_samples == 8  # complete: nothing to redo
    with pytest.raises(StoreMismatchError, match="codec"):
        run(dump_config(Path(teacher), Path(data), store, **{"signals.codec.profile": "compact"}))

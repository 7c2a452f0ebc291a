"""pipeline verify / inspect on small synthetic stores built from consistent SampleSignals."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.tools.inspect_store import main_inspect, main_verify, sample_json, stats, verify
from pipeline.tools.render import overlay, render
from schemas import ShardWriter, write_manifest
from schemas.signal_checks import SALIENCY_SUM_TOL, verify_signals
from schemas.layout import StoredSample
from schemas.reader import StoreReader
from schemas.signals import META_SCHEMA, SIGNAL_GROUPS, SampleSignals, array_specs, pack, unpack

VOCAB, K, KP, DRAWS, IMAGE_TOKEN = 50, 8, 4, 20, 49
SIGNAL_BYTES = {
    "response_tokens": 0,  # filled in by build_store
    "response_topk": {"bytes": 4000, "bytes_per_response_token": 0.0},
    "saliency": {"bytes": 300, "bytes_per_response_token": 0.0},
}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def topk(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [n, k], float32 log-probs [n, k] sorted descending, and the full log-probs [n, VOCAB]."""
    lp = log_softmax(rng.normal(0, 3, (n, VOCAB))).astype(np.float32)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(lp, ids, axis=1), lp


def draw(rng: np.random.Generator, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sampled target of rows of full log-probs [n, VOCAB]: DRAWS ids per row with replacement,
    unique ids [n, m] with counts [n, m], padded with -1 / 0 to the widest row."""
    probs = np.exp(full.astype(np.float64))
    probs /= probs.sum(axis=1, keepdims=True)
    draws = [np.unique(rng.choice(VOCAB, DRAWS, p=p), return_counts=True) for p in probs]
    width = max((len(u) for u, _ in draws), default=0)
    ids = np.full((len(full), width), -1, dtype=np.int64)
    counts = np.zeros((len(full), width), dtype=np.int64)
    for r, (u, c) in enumerate(draws):
        ids[r, :len(u)], counts[r, :len(u)] = u, c
    return ids, counts


def make_signals(sample_id: str, grids: list[tuple[int, int]], n_turns: int, seed: int) -> SampleSignals:
    """A valid sample: [bos, image blocks..., (3 instruction + 4 answer tokens) per turn, eos]."""
    rng = np.random.default_rng(seed)
    seq: list[int] = [1]
    blocks = []
    for i, (r, c) in enumerate(grids):
        blocks.append({"image_index": i, "start": len(seq), "length": r * c, "grid": [r, c]})
        seq += [IMAGE_TOKEN] * (r * c)
    turns = []
    for _ in range(n_turns):
        instr = list(range(len(seq), len(seq) + 3))
        seq += rng.integers(2, VOCAB - 1, 3).tolist()
        answer = list(range(len(seq), len(seq) + 4))
        seq += rng.integers(2, VOCAB - 1, 4).tolist()
        turns.append({"instruction": instr, "response": [a - 1 for a in answer]})
    seq.append(2)
    input_ids = np.asarray(seq, dtype=np.int64)
    resp_pos = np.asarray([t for turn in turns for t in turn["response"]], dtype=np.int64)
    resp_ids, resp_lps, full = topk(rng, len(resp_pos), K)

    # Sampled target: DRAWS ids from p_T, unique ids with counts, padded with -1 / 0.
    sample_ids, sample_counts = draw(rng, full)

    n_vis = sum(r * c for r, c in grids)
    if n_vis:
        raw = rng.random((n_turns, n_vis)).astype(np.float32) + 0.05
        saliency = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
        vis_all = np.concatenate([np.arange(b["start"], b["start"] + b["length"]) for b in blocks])
        mean = saliency.mean(axis=0)
        keep = np.sort(np.argsort(-mean)[: max(1, n_vis // 4)])
        vis_pos, vis_weight = vis_all[keep], mean[keep]
    else:
        saliency = np.zeros((0, 0), np.float32)
        vis_pos, vis_weight = np.zeros(0, np.int64), np.zeros(0, np.float32)
    vis_ids, vis_lps, vis_full = topk(rng, len(vis_pos), K)
    vis_sample_ids, vis_sample_counts = draw(rng, vis_full)

    # Transitions: at two response positions, the top-2 of p_T other than the gold token.
    tpa_pos, tpa_cand, tpa_clp = [], [], []
    for r in (0, len(resp_pos) - 1):
        t = int(resp_pos[r])
        cands = [(int(i), float(lp)) for i, lp in zip(resp_ids[r], resp_lps[r]) if i != input_ids[t + 1]][:2]
        for c, lp in cands:
            tpa_pos.append(t), tpa_cand.append(c), tpa_clp.append(lp)
    tpa_ids, tpa_lps, tpa_full = topk(rng, len(tpa_pos), KP)
    tpa_sample_ids, tpa_sample_counts = draw(rng, tpa_full)
    return SampleSignals(
        sample_id=sample_id, input_ids=input_ids, visual_blocks=blocks, turns=turns,
        image_hashes=[f"hash-{sample_id}-{i}" for i in range(len(grids))],
        resp_pos=resp_pos, resp_ids=resp_ids, resp_logprobs=resp_lps, saliency=saliency,
        vis_pos=vis_pos, vis_weight=vis_weight.astype(np.float32), vis_ids=vis_ids, vis_logprobs=vis_lps,
        sample_ids=sample_ids, sample_counts=sample_counts,
        tpa_pos=np.asarray(tpa_pos, np.int64), tpa_cand=np.asarray(tpa_cand, np.int64),
        tpa_cand_logprob=np.asarray(tpa_clp, np.float32), tpa_ids=tpa_ids, tpa_logprobs=tpa_lps,
        vis_sample_ids=vis_sample_ids, vis_sample_counts=vis_sample_counts,
        tpa_sample_ids=tpa_sample_ids, tpa_sample_counts=tpa_sample_counts,
    )


def write_png(path: Path, size: tuple[int, int], seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


ALL_ROWS = ("response", "visual", "transitions")


def build_store(root: Path, corrupt=None, irs: bool = True,
                sampled_rows: tuple[str, ...] | None = ALL_ROWS) -> tuple[Path, dict[str, SampleSignals]]:
    """A 2-shard store: img1 (1 image, 2 turns) and txt (text-only) in shard-00000, img2 (2 images,
    1 turn) and a skipped sample in shard-00001; a LLaVA JSON with PNGs for every image.
    ``corrupt(signals_by_id)`` edits the signals before packing. ``sampled_rows``: the row kinds
    with a sampled target; None writes a store of the format before they could be chosen (response
    rows only, no ``signals.sampled.rows`` in the manifest)."""
    data = root / "data"
    hashes = {
        "img1": [write_png(data / "img/a.png", (48, 32), 0)],
        "img2": [write_png(data / "img/b.png", (40, 40), 1), write_png(data / "img/c.png", (30, 20), 2)],
    }
    records = [
        {"id": "img1", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Grey."}]},
        {"id": "txt", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]},
        {"id": "img2", "image": ["img/b.png", "img/c.png"], "conversations": [
            {"from": "human", "value": "<image> and <image>: compare them."}, {"from": "gpt", "value": "Same."}]},
        {"id": "bad", "image": "img/missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}]},
    ]
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.json").write_text(json.dumps(records))

    sig = {
        "img1": make_signals("img1", [(2, 3)], 2, seed=1),
        "txt": make_signals("txt", [], 1, seed=2),
        "img2": make_signals("img2", [(2, 2), (3, 2)], 1, seed=3),
    }
    for sid, h in hashes.items():
        sig[sid].image_hashes = h
    if corrupt is not None:
        corrupt(sig)
    store = root / "store"
    specs = array_specs(K, KP, sampled=True, transitions=True, sampled_rows=sampled_rows or ("response",))
    with ShardWriter(store, "shard-00000", specs, META_SCHEMA) as w:
        for sid in ("img1", "txt"):
            w.add(sid, *pack(sig[sid], specs))
    with ShardWriter(store, "shard-00001", specs, META_SCHEMA) as w:
        w.add("img2", *pack(sig["img2"], specs))
        w.add_skipped("bad", "missing_image", "image 0 not found")
    n_resp = sum(len(s.resp_pos) for s in sig.values())
    signal_bytes = copy.deepcopy(SIGNAL_BYTES)
    signal_bytes["response_tokens"] = n_resp
    for g in ("response_topk", "saliency"):
        signal_bytes[g]["bytes_per_response_token"] = signal_bytes[g]["bytes"] / n_resp
    write_manifest(store, {
        "teacher": {"path": "/models/teacher", "model_type": "llava", "config_fingerprint": "c" * 8,
                    "weights_fingerprint": "w" * 8, "dtype": "float32"},
        "tokenizer": {"fingerprint": "t" * 8, "size": VOCAB},
        "dataset": {"path": str(data / "train.json"), "image_root": None, "split": "train", "max_length": 2048,
                    "limit": None, "fingerprint": "d" * 8},
        "signals": {"top_k": K, "temperature": 1.0, "saliency_layers": "auto" if irs else [1],
                    "calibration_samples": 4, "visual_fraction": 0.25, "sampled": sampled_settings(sampled_rows),
                    "transitions": {"enabled": True, "candidates": 2, "top_k": KP, "min_prob": 0.01,
                                    "min_alt_mass": 0.05, "max_positions": 64}},
        "saliency": {"layers": [1], "irs": {"0": 0.1, "1": 0.3, "2": 0.2} if irs else None},
        "signal_bytes": signal_bytes,
    })
    return store, sig


def sampled_settings(rows: tuple[str, ...] | None) -> dict:
    return {"enabled": True, "draws": DRAWS} | ({} if rows is None else {"rows": list(rows)})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("inspect"))


# ---------------------------------------------------------------------------------------------- verify


def test_verify_passes_on_valid_store(built, capsys):
    store, _ = built
    assert verify(store) == []
    assert main_verify(str(store)) == 0
    assert capsys.readouterr().out.strip() == "OK: 3 samples in 2 shards"


def _positive(s):
    s.resp_logprobs[1, 0] = 0.5


def _unsorted(s):
    s.resp_logprobs[2, [0, 1]] = s.resp_logprobs[2, [1, 0]]
    s.resp_ids[2, [0, 1]] = s.resp_ids[2, [1, 0]]


def _mass(s):
    s.resp_logprobs[0, :] = np.log(0.5)  # sorted, <= 0, but sums to 4


def _oov(s):
    s.resp_ids[3, 5] = VOCAB + 3


def _dup(s):
    s.resp_ids[3, 5] = s.resp_ids[3, 0]


def _saliency_sum(s):
    s.saliency[1] *= 1.0 + 5 * SALIENCY_SUM_TOL


def _saliency_len(s):
    s.saliency = s.saliency[:, :-1]


def _tpa_gold(s):
    s.tpa_cand[0] = s.input_ids[s.tpa_pos[0] + 1]


def _tpa_not_resp(s):
    s.tpa_pos[:] = s.turns[0]["instruction"][0]


def _vis_outside(s):
    s.vis_pos[0] = 0


def _resp_union(s):
    s.turns[1]["response"] = s.turns[1]["response"][:-1]


def _draws(s):
    s.sample_counts[2, 0] += 1


def _vis_lp(s):
    s.vis_logprobs[0, -1] = 0.1


def _vis_draws(s):
    s.vis_sample_counts[0, 0] += 1


def _vis_draw_oov(s):
    s.vis_sample_ids[0, 0] = VOCAB


def _tpa_draw_dup(s):
    s.tpa_sample_ids[1, 1] = s.tpa_sample_ids[1, 0]


def _tpa_draw_rows(s):
    s.tpa_sample_ids, s.tpa_sample_counts = s.tpa_sample_ids[:-1], s.tpa_sample_counts[:-1]


CORRUPTIONS = {
    "positive log-prob": (_positive, "resp_logprobs", "log-prob > 0"),
    "unsorted top-k": (_unsorted, "resp_logprobs", "not sorted"),
    "tail mass": (_mass, "resp_logprobs", "negative tail mass"),
    "id out of vocabulary": (_oov, "resp_ids", "outside the vocabulary"),
    "duplicate id": (_dup, "resp_ids", "repeat"),
    "saliency sum": (_saliency_sum, "saliency", "do not sum to 1"),
    "saliency length": (_saliency_len, "saliency", "expected 12"),
    "tpa candidate is gold": (_tpa_gold, "tpa_cand", "gold token"),
    "tpa position not a response position": (_tpa_not_resp, "tpa_pos", "non-response"),
    "vis_pos outside blocks": (_vis_outside, "vis_pos", "outside the visual blocks"),
    "resp_pos vs turns": (_resp_union, "resp_pos", "union of the turns"),
    "sampled counts vs draws": (_draws, "resp_sample_counts", f"draws = {DRAWS}"),
    "visual log-prob": (_vis_lp, "vis_logprobs", "log-prob > 0"),
    "visual sampled counts vs draws": (_vis_draws, "vis_sample_counts", f"draws = {DRAWS}"),
    "visual sampled id out of vocabulary": (_vis_draw_oov, "vis_sample_ids", "outside the vocabulary"),
    "branch sampled id repeats": (_tpa_draw_dup, "tpa_sample_ids", "repeats at branch row 1"),
    "branch sampled rows vs branch rows": (_tpa_draw_rows, "tpa_sample_n", "rows for 4 branch rows"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_semantic_corruption_reported_naming_sample_and_array(tmp_path, name, capsys):
    fn, array, phrase = CORRUPTIONS[name]
    store, _ = build_store(tmp_path, corrupt=lambda sig: fn(sig["img1"]))
    problems = verify(store)
    assert any("shard 'shard-00000'" in p and "sample 'img1'" in p and f"'{array}'" in p and phrase in p
               for p in problems), problems
    assert not any("'img2'" in p or "'txt'" in p for p in problems), problems  # only the corrupted sample
    assert main_verify(str(store)) == 1
    out = capsys.readouterr().out
    assert "sample 'img1'" in out and "FAILED" in out


def test_checksum_corruption_reported_by_structural_layer(tmp_path, capsys):
    store, _ = build_store(tmp_path)
    shard = store / "shards/shard-00001"
    chunk = [p for p in sorted((shard / "arrays.zarr/resp_logprobs").rglob("*")) if p.is_file()
             and p.name != "zarr.json"][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify(store)
    assert any("shard-00001" in p and "sha256" in p for p in problems), problems
    assert main_verify(str(store)) != 0
    assert "sha256" in capsys.readouterr().out


def test_verify_signals_stops_after_max_problems(tmp_path):
    def corrupt(sig):
        for s in sig.values():
            s.resp_logprobs[:] = 0.5
    store, _ = build_store(tmp_path, corrupt=corrupt)
    problems = verify_signals(store, max_problems=2)
    assert len(problems) == 3 and problems[-1].startswith("stopped after 2 problems at sample 'img1'")
    assert all("'img1'" in p for p in problems[:2])


# ---------------------------------------------------------------------------------------------- sample_json


def test_sample_json_matches_signals(built):
    store, sig = built
    for sid in ("img1", "img2", "txt"):
        s = sig[sid]
        d = sample_json(store, sid)
        assert json.loads(json.dumps(d)) == d  # plain JSON types only
        assert d["sample_id"] == sid and d["input_ids"] == s.input_ids.tolist()
        assert d["visual_blocks"] == s.visual_blocks and d["turns"] == s.turns
        assert [r["position"] for r in d["response"]] == s.resp_pos.tolist()
        np.testing.assert_array_equal([r["ids"] for r in d["response"]], s.resp_ids)
        np.testing.assert_array_equal(np.asarray([r["logprobs"] for r in d["response"]], np.float32),
                                      s.resp_logprobs)
        for r, entry in enumerate(d["response"]):
            valid = s.sample_counts[r] > 0
            assert entry["sampled_ids"] == s.sample_ids[r][valid].tolist()
            assert entry["sampled_counts"] == s.sample_counts[r][valid].tolist()
        # Saliency: per turn, per image block, a rows x cols grid of the stored float16 values.
        if s.visual_blocks:
            off = 0
            for b_i, b in enumerate(s.visual_blocks):
                rows, cols = b["grid"]
                for j in range(len(s.turns)):
                    img = d["saliency"][j]["images"][b_i]
                    assert img["grid"] == [rows, cols] and img["image_index"] == b["image_index"]
                    expect = s.saliency[j, off:off + rows * cols].astype(np.float16).reshape(rows, cols)
                    np.testing.assert_array_equal(np.asarray(img["map"], np.float16), expect)
                off += rows * cols
        else:
            assert d["saliency"] == [] and d["visual"] == []
        assert [v["position"] for v in d["visual"]] == s.vis_pos.tolist()
        np.testing.assert_array_equal(np.asarray([v["weight"] for v in d["visual"]], np.float32), s.vis_weight)
        for v, ids, lps in zip(d["visual"], s.vis_ids, s.vis_logprobs):
            assert v["ids"] == ids.tolist()
            np.testing.assert_array_equal(np.asarray(v["logprobs"], np.float32), lps)
        # Transitions grouped by position, candidates in row order.
        flat = [(t["position"], c) for t in d["transitions"] for c in t["candidates"]]
        assert len({t["position"] for t in d["transitions"]}) == len(d["transitions"]) == 2
        assert [p for p, _ in flat] == s.tpa_pos.tolist()
        assert [c["id"] for _, c in flat] == s.tpa_cand.tolist()
        np.testing.assert_array_equal(np.asarray([c["logprob"] for _, c in flat], np.float32), s.tpa_cand_logprob)
        np.testing.assert_array_equal([c["ids"] for _, c in flat], s.tpa_ids)
        np.testing.assert_array_equal(np.asarray([c["logprobs"] for _, c in flat], np.float32), s.tpa_logprobs)
        # Sampled targets of the visual and branch rows, beside their top-k rows.
        for rows, ids, counts in ((d["visual"], s.vis_sample_ids, s.vis_sample_counts),
                                  ([c for _, c in flat], s.tpa_sample_ids, s.tpa_sample_counts)):
            assert len(rows) == len(ids)
            for entry, i, c in zip(rows, ids, counts):
                assert entry["sampled_ids"] == i[c > 0].tolist() and entry["sampled_counts"] == c[c > 0].tolist()


def test_sample_json_unknown_id_names_it_and_the_store(built):
    store, _ = built
    with pytest.raises(PipelineError, match=r"'nope'.*" + str(store).replace("/", ".")):
        sample_json(store, "nope")


def test_main_inspect_sample_json_prints_the_dict(built, capsys):
    store, _ = built
    assert main_inspect(str(store), "img2", True, None, 4, None, None) == 0
    assert json.loads(capsys.readouterr().out) == sample_json(store, "img2")
    assert main_inspect(str(store), "img2", False, None, 4, None, None) == 0
    assert "grid 3x2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- stats


def test_stats_equal_what_was_written(built, capsys):
    store, sig = built
    st = stats(store)
    lengths = [len(s.input_ids) for s in sig.values()]
    assert st["samples"] == 3 and st["shards"] == 2
    assert st["image_samples"] == 2 and st["text_only_samples"] == 1
    assert st["skipped"] == 1 and st["skipped_reasons"] == {"missing_image": 1}
    assert st["tokens"] == {"total": sum(lengths), "mean_length": sum(lengths) / 3, "max_length": max(lengths)}
    assert st["response_tokens"] == sum(len(s.resp_pos) for s in sig.values())
    assert st["visual_tokens"] == 6 + 4 + 6
    assert st["stored_visual_positions"] == sum(len(s.vis_pos) for s in sig.values())
    assert st["transition_rows"] == sum(len(s.tpa_pos) for s in sig.values())
    unique = {g: sum(int((getattr(s, f"{g}sample_counts") > 0).sum()) for s in sig.values())
              for g in ("", "vis_", "tpa_")}
    assert (st["sampled_ids"], st["sampled_ids_visual"], st["sampled_ids_transitions"]) == \
        (unique[""], unique["vis_"], unique["tpa_"]) and min(unique.values()) > 0
    n_resp = st["response_tokens"]
    assert st["signal_bytes"]["response_topk"] == {"bytes": 4000, "bytes_per_response_token": 4000 / n_resp}
    assert st["saliency"] == {"layers": [1], "irs": {"0": 0.1, "1": 0.3, "2": 0.2}}
    assert st["settings"]["sampled"]["draws"] == DRAWS
    json.dumps(st)

    assert main_inspect(str(store), None, False, None, 4, None, None) == 0
    table = capsys.readouterr().out
    assert f"{'samples':<28}3" in table and "missing_image 1" in table
    assert "* layer   1  0.3000" in table and "response_topk" in table
    assert (f"sampled target ids          response {unique['']}, visual {unique['vis_']}, "
            f"transitions {unique['tpa_']}") in table


# ---------------------------------------------------------------------------------------------- render


def test_overlay_is_hot_where_saliency_is_high():
    gray = Image.new("RGB", (40, 20), (128, 128, 128))
    a = overlay(gray, np.array([[1.0, 0.0], [0.0, 0.0]]))
    b = overlay(gray, np.array([[0.0, 0.0], [0.0, 1.0]]))
    assert a.shape == (20, 40, 3) and a.dtype == np.uint8
    hot, cold = a[:10, :20].astype(int), a[10:, 20:].astype(int)
    assert (hot[..., 0] > cold[..., 0] + 50).all()  # jet: high = red
    assert (cold[..., 2] > hot[..., 2] + 50).all()  # low = blue
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a[:10, :20], b[10:, 20:])  # the same cell value renders the same


def _pngs_ok(paths):
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] > 0 and im.size[1] > 0


def test_render_writes_pngs(built, tmp_path):
    store, _ = built
    paths = render(store, tmp_path / "png", n_samples=4)
    names = [p.name for p in paths]
    assert names == ["saliency_00_img1.png", "saliency_01_img2.png", "irs.png", "response_distributions.png"]
    _pngs_ok(paths)
    # Different saliency, different picture.
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        assert a.size != b.size or not np.array_equal(np.asarray(a), np.asarray(b))


def test_render_skips_sample_whose_image_changed(tmp_path, caplog):
    store, _ = build_store(tmp_path)
    write_png(tmp_path / "data/img/a.png", (48, 32), seed=99)  # img1's image is not what was dumped
    with caplog.at_level(logging.WARNING, logger="pipeline.inspect"):
        paths = render(store, tmp_path / "png", n_samples=4)
    assert [p.name for p in paths if p.name.startswith("saliency")] == ["saliency_00_img2.png"]
    assert any("'img1'" in r.getMessage() and "hash" in r.getMessage() for r in caplog.records)


def test_render_without_irs_table_and_with_data_override(tmp_path, caplog):
    store, _ = build_store(tmp_path, irs=False)
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    with caplog.at_level(logging.INFO, logger="pipeline.inspect"):
        paths = render(store, tmp_path / "png", n_samples=1, data_path=moved / "train.json")
    assert [p.name for p in paths] == ["saliency_00_img1.png", "response_distributions.png"]
    _pngs_ok(paths)
    assert any("IRS plot skipped" in r.getMessage() for r in caplog.records)


def test_main_inspect_out_renders(built, tmp_path, capsys):
    store, _ = built
    assert main_inspect(str(store), None, False, str(tmp_path / "png"), 1, None, None) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "saliency_00_img1.png" in out and (tmp_path / "png/irs.png").is_file()


# ---------------------------------------------------------------------------------------------- sampled rows


def assert_sampled_equal(got: SampleSignals, want: SampleSignals, prefix: str) -> None:
    """One row kind's sampled target read back: the written rows, re-padded to the widest row."""
    (ids, counts), (w_ids, w_counts) = got.sampled(prefix), want.sampled(prefix)
    assert ids.shape[0] == w_ids.shape[0], (want.sample_id, prefix)
    assert ids.shape[1] == int((w_counts > 0).sum(1).max(initial=0)), (want.sample_id, prefix)
    for r in range(len(w_ids)):
        keep = w_counts[r] > 0
        np.testing.assert_array_equal(ids[r][counts[r] > 0], w_ids[r][keep], err_msg=f"{want.sample_id}/{prefix}/{r}")
        np.testing.assert_array_equal(counts[r][counts[r] > 0], w_counts[r][keep])


def test_sampled_rows_of_every_kind_round_trip_through_the_store(built):
    """pack -> shard -> unpack gives each kind's sampled target back; the text-only sample has no
    visual row (an empty [0, 0] target, not None), and the manifest names the kinds."""
    store, sig = built
    reader = StoreReader(store)
    assert reader.manifest.sampled_rows == list(ALL_ROWS) and reader.manifest.has_sampled
    for sid, want in sig.items():
        got = unpack(reader.get(sid))
        for prefix in ("resp", "vis", "tpa"):
            assert_sampled_equal(got, want, prefix)
    assert unpack(reader.get("txt")).vis_sample_ids.shape == (0, 0)
    assert verify(store) == []


def test_sampled_rows_pack_and_unpack_with_no_visual_rows_and_no_branches():
    """A sample without stored visual rows or branch rows packs to zero rows of each and unpacks to
    [0, 0] targets; a store that expects a kind's targets refuses a sample without them, naming it."""
    s = make_signals("plain", [], 1, seed=4)
    s.tpa_pos, s.tpa_cand = np.zeros(0, np.int64), np.zeros(0, np.int64)
    s.tpa_cand_logprob, s.tpa_ids, s.tpa_logprobs = np.zeros(0, np.float32), np.zeros((0, KP), np.int64), np.zeros((0, KP), np.float32)
    s.tpa_sample_ids, s.tpa_sample_counts = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
    specs = array_specs(K, KP, sampled=True, transitions=True, sampled_rows=ALL_ROWS)
    meta, arrays = pack(s, specs)
    for prefix in ("vis", "tpa"):
        assert len(arrays[f"{prefix}_sample_n"]) == len(arrays[f"{prefix}_sample_ids"]) == 0
    back = unpack(StoredSample("plain", meta, arrays))
    assert back.vis_sample_ids.shape == back.tpa_sample_counts.shape == (0, 0)
    assert_sampled_equal(back, s, "resp")
    s.vis_sample_ids = None
    with pytest.raises(ValueError, match="'plain'.*visual rows"):
        pack(s, specs)


def test_store_without_visual_or_branch_draws_reads_as_before(tmp_path):
    """A store of the format before sampled rows could be chosen (response draws only, no
    signals.sampled.rows): it verifies, reads with None for the new kinds, and its manifest says
    response only."""
    store, sig = build_store(tmp_path, sampled_rows=None)
    reader = StoreReader(store)
    assert not any(name.startswith(("vis_sample", "tpa_sample")) for name in reader.manifest.decoded_arrays)
    assert reader.manifest.sampled_rows == ["response"] and reader.manifest.has_sampled
    assert verify(store) == []
    for sid, want in sig.items():
        got = unpack(reader.get(sid))
        assert got.vis_sample_ids is None and got.tpa_sample_ids is None and got.tpa_sample_counts is None
        assert_sampled_equal(got, want, "resp")


def test_array_specs_and_signal_groups_cover_the_sampled_rows():
    specs = array_specs(K, KP, sampled=True, transitions=True, sampled_rows=["visual"])
    assert [n for n in specs if "_sample_" in n] == ["vis_sample_n", "vis_sample_ids", "vis_sample_counts"]
    assert SIGNAL_GROUPS["visual_sampled"] == ["vis_sample_n", "vis_sample_ids", "vis_sample_counts"]
    assert SIGNAL_GROUPS["transitions_sampled"] == ["tpa_sample_n", "tpa_sample_ids", "tpa_sample_counts"]
    with pytest.raises(ValueError, match="unknown sampled row kind"):
        array_specs(K, KP, sampled=True, transitions=True, sampled_rows=["branches"])
    with pytest.raises(ValueError, match="need transitions"):
        array_specs(K, KP, sampled=True, transitions=False, sampled_rows=["transitions"])

"""Stage 2 data: remapping teacher signals onto a student's sequence, the epoch order, compatibility
checks, and StoreDataset batches (workers, determinism, resume) on real stores of tiny teachers."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image
from test_dump import dump_config, make_dataset
from torch.utils.data import DataLoader

from pipeline.data import EncodedSample, Record, encode, read_records
from pipeline.data.encode import IGNORE_INDEX, TurnPositions, VisualBlock
from pipeline.tools.tiny import build_tiny_vlm
from schemas import StoreFormatError, StoreReader
from schemas.signals import SampleSignals, unpack
from pipeline.modeling.branches import forward_with_branches
from stage1_teacher.dump import run
from pipeline.modeling.probe import capture
from stage2_student import losses as L
from schemas.compat import IncompatibleStudentError, check_compatible, check_ids_in_vocab
from stage2_student.data import (
    StoreDataset,
    StudentDataError,
    batches_per_epoch,
    epoch_order,
    epoch_samples,
    packed,
    remap,
)
from stage2_student.data.pixel_cache import PixelCache
from stage2_student.data.reencode import StudentEncoder
from stage2_student.data.remap import _axis_overlap, _remap_visual, _resample_sum, _union_mean

# --------------------------------------------------------------------------------------------------
# fixtures: one store per family (10 samples in shards of 4, 4, 2), students built from presets


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("s2data"), n=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, data_file) -> Path:
    out = tmp_path_factory.mktemp("s2store") / "store"
    run(dump_config(tiny_teacher_dir, data_file, out))
    return out


@pytest.fixture(scope="module")
def student(family):
    return build_tiny_vlm(family, "student", seed=1)


@pytest.fixture(scope="module")
def pooled(family):
    return build_tiny_vlm(family, "student-pooled", seed=1)


def pairs(store: Path, data_file: Path, processor):
    """(teacher signals, student encoding) of every stored sample."""
    reader = StoreReader(store)
    records = {r.sample_id: r for r in read_records(data_file)}
    return [(unpack(reader.get(sid)), encode(records[sid], processor, 400)) for sid in reader.sample_ids()]


# --------------------------------------------------------------------------------------------------
# remap


def test_remap_same_grid_is_identity(store, data_file, student):
    for teacher, enc in pairs(store, data_file, student[1]):
        assert [tuple(b["grid"]) for b in teacher.visual_blocks] == [b.grid for b in enc.visual_blocks]
        tg = remap(teacher, enc)
        np.testing.assert_array_equal(tg.resp_pos, teacher.resp_pos)
        np.testing.assert_array_equal(tg.resp_ids, teacher.resp_ids)
        np.testing.assert_array_equal(tg.vis_pos, teacher.vis_pos)
        np.testing.assert_array_equal(tg.vis_ids, teacher.vis_ids)
        np.testing.assert_array_equal(tg.vis_logprobs, teacher.vis_logprobs)
        np.testing.assert_array_equal(tg.vis_weight, teacher.vis_weight)
        if teacher.n_visual:
            np.testing.assert_array_equal(tg.saliency, teacher.saliency)
        else:  # text only: no visual position, one empty map per turn
            assert tg.saliency.shape == (len(enc.turns), 0)
        np.testing.assert_array_equal(tg.tpa_pos, teacher.tpa_pos)
        np.testing.assert_array_equal(tg.labels, enc.labels)


def test_remap_identity_shortcut_equals_the_block_by_block_path(store, data_file, student):
    n_images = 0
    for teacher, enc in pairs(store, data_file, student[1]):
        tg = remap(teacher, enc)
        geometry = [(int(b["start"]), int(b["length"]), tuple(b["grid"]), sb.grid, sb.start)
                    for b, sb in zip(teacher.visual_blocks, enc.visual_blocks)]
        n_images += len(geometry)
        got = (tg.saliency, tg.vis_pos, tg.vis_weight, tg.vis_ids, tg.vis_logprobs)
        expected = _remap_visual(teacher, geometry, len(enc.turns), teacher.vis_ids.shape[1], "x")
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and np.array_equal(a, b), teacher.sample_id
    assert n_images >= 10


def test_remap_pooled_student_on_a_real_store(store, data_file, pooled):
    n_pooled = 0
    for teacher, enc in pairs(store, data_file, pooled[1]):
        tg = remap(teacher, enc)
        # Text positions map through the segment spans: same tokens, shifted by the lost visual tokens.
        np.testing.assert_array_equal(enc.input_ids[tg.resp_pos], teacher.input_ids[teacher.resp_pos])
        np.testing.assert_array_equal(enc.input_ids[tg.tpa_pos], teacher.input_ids[teacher.tpa_pos])
        np.testing.assert_array_equal(tg.resp_pos, enc.response_positions)
        # Saliency: area sum, checked by hand on the reshaped map of each block; totals kept.
        t_off = s_off = 0
        for tb, sb in zip(teacher.visual_blocks, enc.visual_blocks):
            (R, C), (r, c) = tb["grid"], sb.grid
            assert (R // r, C // c) == (2, 2)
            n_pooled += 1
            t_map = teacher.saliency[:, t_off : t_off + R * C].reshape(-1, R, C)
            s_map = tg.saliency[:, s_off : s_off + r * c].reshape(-1, r, c)
            for i in range(r):
                for j in range(c):
                    expected = t_map[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].sum(axis=(1, 2))
                    np.testing.assert_allclose(s_map[:, i, j], expected, rtol=1e-5, atol=1e-7)
            t_off, s_off = t_off + R * C, s_off + r * c
        if teacher.n_visual:
            np.testing.assert_allclose(tg.saliency.sum(1), teacher.saliency.sum(1), rtol=1e-5)
            np.testing.assert_allclose(tg.saliency.sum(1), 1.0, atol=2e-3)  # stored in float16
        # Visual rows: on the student's visual positions, one per merged cell, sub-normalised.
        assert set(tg.vis_pos) <= set(enc.visual_positions)
        assert len(tg.vis_pos) == len(set(tg.vis_pos)) <= len(teacher.vis_pos)
        assert np.isclose(tg.vis_weight.sum(), teacher.vis_weight.sum(), rtol=1e-5)
        assert (np.exp(tg.vis_logprobs).sum(1) <= 1 + 1e-5).all()
    assert n_pooled > 0


def _hand_case(teacher_grid=(2, 4), student_grid=(1, 2)):
    """Teacher: text [10, 11], an image block, text [12, 13]; the student sees the same image pooled."""
    R, C = teacher_grid
    r, c = student_grid
    t_ids = np.array([10, 11] + [3] * (R * C) + [12, 13])
    s_ids = np.array([10, 11] + [3] * (r * c) + [12, 13])
    T = len(t_ids)
    sal = np.array([[0.05, 0.10, 0.15, 0.20, 0.01, 0.09, 0.25, 0.15][: R * C]], dtype=np.float32)
    # stored cells 0 (r0c0), 1 (r0c1), 5 (r1c1) -> student cell 0; cell 6 (r1c2) -> student cell 1
    teacher = SampleSignals(
        sample_id="hand",
        input_ids=t_ids,
        visual_blocks=[{"image_index": 0, "start": 2, "length": R * C, "grid": [R, C]}],
        turns=[{"instruction": [1], "response": [T - 2]}],
        image_hashes=["h"],
        resp_pos=np.array([T - 2]),
        resp_ids=np.array([[13, 12]]),
        resp_logprobs=np.log(np.array([[0.9, 0.05]], dtype=np.float32)),
        saliency=sal,
        vis_pos=np.array([2, 3, 7, 8]),
        vis_weight=np.array([0.2, 0.1, 0.3, 0.05], dtype=np.float32),
        vis_ids=np.array([[5, 7], [7, 8], [5, 9], [9, 5]]),
        vis_logprobs=np.log(np.array([[0.5, 0.3], [0.6, 0.2], [0.5, 0.3], [0.7, 0.1]], dtype=np.float32)),
        tpa_pos=np.array([T - 2, T - 2]),
        tpa_cand=np.array([12, 11]),
        tpa_cand_logprob=np.log(np.array([0.05, 0.01], dtype=np.float32)),
        tpa_ids=np.array([[13], [13]]),
        tpa_logprobs=np.log(np.array([[0.5], [0.4]], dtype=np.float32)),
    )
    labels = np.full(len(s_ids), IGNORE_INDEX)
    labels[-1] = 13
    enc = EncodedSample(
        sample_id="hand",
        input_ids=s_ids,
        labels=labels,
        visual_blocks=[VisualBlock(0, 2, r * c, (r, c))],
        turns=[TurnPositions(instruction=np.array([1]), response=np.array([len(s_ids) - 2]))],
        image_hashes=["h"],
        model_inputs={},
    )
    return teacher, enc


def test_remap_pooled_hand_computed():
    teacher, enc = _hand_case()
    tg = remap(teacher, enc)
    # saliency [0.05 0.10 0.15 0.20 / 0.01 0.09 0.25 0.15] -> [0.05+0.10+0.01+0.09, 0.15+0.20+0.25+0.15]
    np.testing.assert_allclose(tg.saliency, [[0.25, 0.75]], rtol=1e-6)
    np.testing.assert_array_equal(tg.vis_pos, [2, 3])
    np.testing.assert_allclose(tg.vis_weight, [0.6, 0.05], rtol=1e-6)
    # cell 0 = mean of 3 cells over the union {5, 7, 8, 9}: 5 -> (0.5+0+0.5)/3, 7 -> (0.3+0.6)/3,
    # 9 -> 0.3/3, 8 -> 0.2/3; top-2 kept: 5, 7. Cell 1 is the single stored cell 6, unchanged.
    np.testing.assert_array_equal(tg.vis_ids, [[5, 7], [9, 5]])
    np.testing.assert_allclose(np.exp(tg.vis_logprobs), [[1.0 / 3, 0.3], [0.7, 0.1]], rtol=1e-6)
    np.testing.assert_array_equal(tg.resp_pos, [4])
    np.testing.assert_array_equal(tg.tpa_pos, [4, 4])
    np.testing.assert_array_equal(tg.labels, enc.labels)


def test_remap_pooled_pads_a_short_union():
    teacher, enc = _hand_case()
    teacher.vis_pos, teacher.vis_weight = teacher.vis_pos[3:], teacher.vis_weight[3:]
    teacher.vis_ids = np.array([[9, -1]])
    teacher.vis_logprobs = np.array([[np.log(0.7), -np.inf]], dtype=np.float32)
    tg = remap(teacher, enc)
    np.testing.assert_array_equal(tg.vis_ids, [[9, -1]])
    assert tg.vis_logprobs[0, 1] == -np.inf


def test_remap_non_integer_geometry_hand_computed():
    """3x3 teacher -> 2x2 student: each axis splits the middle teacher cell in halves (overlap 1, 1/2)."""
    teacher, enc = _hand_case(teacher_grid=(3, 3), student_grid=(2, 2))
    teacher.saliency = np.array([[0.05, 0.10, 0.15, 0.20, 0.01, 0.09, 0.25, 0.10, 0.05]], dtype=np.float32)
    teacher.vis_pos, teacher.vis_weight = teacher.vis_pos[:1], teacher.vis_weight[:1]  # teacher cell (0, 0)
    teacher.vis_ids, teacher.vis_logprobs = teacher.vis_ids[:1], teacher.vis_logprobs[:1]
    tg = remap(teacher, enc)
    s = teacher.saliency[0].astype(np.float64).reshape(3, 3)
    a = np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]])  # student cell i's share of teacher cell (row/col) a
    np.testing.assert_allclose(tg.saliency[0].reshape(2, 2), a @ s @ a.T, rtol=1e-6)
    np.testing.assert_allclose(tg.saliency.sum(), s.sum(), rtol=1e-6)  # mass preserved
    # Teacher cell (0, 0) lies wholly in student cell (0, 0): its distribution, its weight.
    np.testing.assert_array_equal(tg.vis_pos, [2])
    np.testing.assert_allclose(tg.vis_weight, [0.2], rtol=1e-6)
    np.testing.assert_array_equal(tg.vis_ids, teacher.vis_ids)
    np.testing.assert_allclose(tg.vis_logprobs, teacher.vis_logprobs, rtol=1e-6)


def test_remap_refuses_other_text_naming_the_sample():
    teacher, enc = _hand_case()
    enc.input_ids = enc.input_ids.copy()
    enc.input_ids[-1] = 14
    with pytest.raises(IncompatibleStudentError, match=r"sample 'hand'.*tokenizer or chat template"):
        remap(teacher, enc)
    teacher, enc = _hand_case()
    enc.visual_blocks = []
    with pytest.raises(IncompatibleStudentError, match=r"sample 'hand'.*1 image block.*0"):
        remap(teacher, enc)


# --------------------------------------------------------------------------------------------------
# compatibility


def test_check_compatible(store, family, student, pooled):
    manifest = StoreReader(store).manifest
    check_compatible(manifest, student[1], temperature=1.0)
    check_compatible(manifest, pooled[1])  # another image processor is fine: geometry is per sample

    _, other = build_tiny_vlm(family, "student", vocab_size=600)
    with pytest.raises(IncompatibleStudentError) as e:
        check_compatible(manifest, other)
    store_fp = manifest["tokenizer"]["fingerprint"]
    assert f"teacher tokenizer {store_fp[:12]} vs the student's" in str(e.value)
    from schemas.fingerprints import tokenizer_fingerprint

    assert tokenizer_fingerprint(other.tokenizer)[:12] in str(e.value)

    _, templated = build_tiny_vlm(family, "student")
    templated.chat_template = templated.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(IncompatibleStudentError, match="chat template .* vs the student's"):
        check_compatible(manifest, templated)

    with pytest.raises(IncompatibleStudentError) as e:
        check_compatible(manifest, student[1], temperature=2.0)
    assert "trained at τ=2.0 but the store was dumped at τ=1.0; re-dump or train at 1.0" in str(e.value)


def test_padded_embedding_rows_are_fine_but_ids_must_exist(store, family):
    model, processor = build_tiny_vlm(family, "student")
    vocab = len(processor.tokenizer)
    model.resize_token_embeddings(vocab + 64)  # padded rows: a model property, not a tokenizer one
    check_compatible(StoreReader(store).manifest, processor)
    check_ids_in_vocab(vocab - 1, vocab)
    check_ids_in_vocab(vocab + 10, model.get_output_embeddings().weight.shape[0])
    with pytest.raises(IncompatibleStudentError, match=f"token id {vocab}.*{vocab} tokens"):
        check_ids_in_vocab(vocab, vocab)


def test_dataset_refuses_ids_outside_the_vocab(store, student):
    ds = StoreDataset(store, student[1], batch_size=2, vocab_size=8)
    with pytest.raises(IncompatibleStudentError, match=r"sample 's\d\d' of the store holds token id"):
        next(iter(ds))


# --------------------------------------------------------------------------------------------------
# order

SIZES = {"shard-00002": 7, "shard-00000": 10, "shard-00001": 0, "shard-00003": 3}


def test_epoch_order_is_a_pure_cover_of_consecutive_blocks():
    order = epoch_order(3, 0, SIZES, 4)
    assert order == epoch_order(3, 0, dict(reversed(SIZES.items())), 4)  # pure, dict order irrelevant
    assert order != epoch_order(3, 1, SIZES, 4)
    assert order != epoch_order(4, 0, SIZES, 4)
    seen = Counter()
    for shard, start, stop in order:
        assert 0 <= start < stop <= SIZES[shard] and stop - start <= 4 and start % 4 == 0
        seen.update((shard, i) for i in range(start, stop))
    assert seen == Counter({(s, i): 1 for s, n in SIZES.items() for i in range(n)})


def test_epoch_samples_shuffle_within_windows():
    blocks = epoch_order(3, 2, SIZES, 2)
    samples = epoch_samples(3, 2, SIZES, 2, window_blocks=3)
    assert samples == epoch_samples(3, 2, SIZES, 2, window_blocks=3)
    assert sorted(samples) == sorted((s, i) for s, n in SIZES.items() for i in range(n))
    pos = 0
    for w in range(0, len(blocks), 3):  # each window holds exactly the samples of its blocks
        members = {(s, i) for s, a, b in blocks[w : w + 3] for i in range(a, b)}
        assert set(samples[pos : pos + len(members)]) == members
        pos += len(members)
    assert samples != [(s, i) for s, a, b in blocks for i in range(a, b)]  # shuffled inside windows
    assert batches_per_epoch(SIZES, 3) == 7 and batches_per_epoch(SIZES, 3, drop_last=True) == 6


def test_length_groups_sort_each_run_and_keep_its_samples():
    sizes = {"a": 13, "b": 9}
    rng = np.random.default_rng(0)
    lengths = {"a": rng.integers(5, 50, 13), "b": rng.integers(5, 50, 9)}
    plain = epoch_samples(3, 1, sizes, 2, window_blocks=3)
    grouped = epoch_samples(3, 1, sizes, 2, window_blocks=3, lengths=lengths, group=6)
    assert grouped == epoch_samples(3, 1, sizes, 2, window_blocks=3, lengths=lengths, group=6)  # pure
    assert grouped != plain
    blocks = epoch_order(3, 1, sizes, 2)
    window = {(s, i): w // 3 for w, (s, a, b) in enumerate(blocks) for i in range(a, b)}
    for g in range(0, len(plain), 6):  # each run of 6 holds the same samples, sorted by (window, -length)
        run = grouped[g : g + 6]
        assert set(run) == set(plain[g : g + 6])
        keys = [(window[x], -int(lengths[x[0]][x[1]])) for x in run]
        assert keys == sorted(keys)
    assert [window[x] for x in grouped] == sorted(window[x] for x in grouped)  # windows stay in order
    with pytest.raises(ValueError, match="length groups"):
        epoch_samples(3, 1, sizes, 2, window_blocks=3, group=6)


# --------------------------------------------------------------------------------------------------
# StoreDataset


def _fields(batch) -> dict:
    """Every tensor (and the ids and position) of a batch, flattened, by name."""
    out = {"ids": batch.sample_ids, "pos": batch.position, "labels": batch.labels}
    out |= {f"in.{k}": v for k, v in batch.model_inputs.items()}

    def add(name, value):
        if isinstance(value, list) and value and not isinstance(value[0], str):
            for i, v in enumerate(value):
                add(f"{name}.{i}", v)
        else:
            out[name] = value

    for group in ("kd", "iva", "saliency", "tpa"):
        for name, value in vars(getattr(batch, group)).items():
            add(f"{group}.{name}", value)
    return out


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        fx, fy = _fields(x), _fields(y)
        assert fx.keys() == fy.keys()
        for k in fx:
            if isinstance(fx[k], torch.Tensor):
                assert torch.equal(fx[k], fy[k]), k
            else:
                assert fx[k] == fy[k], k


def _dataset(store, processor, **kw):
    return StoreDataset(store, processor, **{"batch_size": 3, "seed": 5, "block_size": 2, "window_blocks": 2, **kw})


def test_dataset_every_sample_once_any_workers(store, student):
    ds = _dataset(store, student[1])
    ids = StoreReader(store).sample_ids()
    serial = list(DataLoader(ds, batch_size=None, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=None, num_workers=2))
    for batches in (serial, parallel):
        flat = [sid for b in batches for sid in b.sample_ids]
        assert sorted(flat) == sorted(ids)  # every sample exactly once
        assert [b.position for b in batches] == [(0, i) for i in range(batches_per_epoch(ds.shard_sizes, 3))]
    assert_same_batches(serial, parallel)  # same batches, same order
    assert_same_batches(serial, list(_dataset(store, student[1])))  # a second run
    ds.set_epoch(1)
    other = [b.sample_ids for b in ds]
    assert other != [b.sample_ids for b in serial]
    assert sorted(s for b in other for s in b) == sorted(ids)


def test_length_grouped_batches_pad_less_and_resume(store, student):
    plain = list(_dataset(store, student[1], window_blocks=8))
    grouped = list(_dataset(store, student[1], window_blocks=8, length_group=2))
    reader = StoreReader(store)
    lengths = dict(zip(reader.sample_ids(), np.concatenate(list(reader.index_column("length").values()))))
    with pytest.raises(StoreFormatError, match="no column 'nope'"):
        reader.index_column("nope")
    # runs of 2 batches: the same samples as without grouping, longest first
    for g in range(0, len(plain), 2):
        ids = [sid for b in grouped[g : g + 2] for sid in b.sample_ids]
        assert sorted(ids) == sorted(sid for b in plain[g : g + 2] for sid in b.sample_ids)
        assert [lengths[i] for i in ids] == sorted((lengths[i] for i in ids), reverse=True)
    padded = lambda batches: sum(b.model_inputs["input_ids"].numel() for b in batches)  # noqa: E731
    assert padded(grouped) < padded(plain)
    resumed = list(DataLoader(_dataset(store, student[1], window_blocks=8, length_group=2, start=(0, 1)),
                              batch_size=None, num_workers=2))
    assert_same_batches(resumed, grouped[1:])
    with pytest.raises(ValueError, match="length_group"):
        _dataset(store, student[1], length_group=-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_resume_yields_the_remaining_batches(store, student, workers):
    full = list(_dataset(store, student[1], start=(1, 0)))
    for start in (1, 2):
        resumed = list(DataLoader(_dataset(store, student[1], start=(1, start)), batch_size=None, num_workers=workers))
        assert_same_batches(resumed, full[start:])


def test_dataset_ranks_split_the_batches(store, student):
    full = [b.sample_ids for b in _dataset(store, student[1])]
    r0 = [b.sample_ids for b in _dataset(store, student[1], rank=0, world_size=2)]
    r1 = _dataset(store, student[1], rank=1, world_size=2)
    assert r0 == full[0::2] and [b.sample_ids for b in r1] == full[1::2]
    r1.start = (0, 1)  # resume counts the batches this rank has yielded
    assert [b.sample_ids for b in r1] == full[3::2]
    with pytest.raises(ValueError, match="out of range"):
        r1.start = (0, r1.batches_this_rank + 1)


@pytest.mark.parametrize("preset", ["student", "student-pooled"])
def test_batch_layout_feeds_the_student_and_the_losses(store, family, preset):
    model, processor = build_tiny_vlm(family, preset, seed=1)
    ds = _dataset(store, processor, temperature=1.0)
    for batch in ds:
        B, T = batch.labels.shape
        assert batch.model_inputs["input_ids"].shape == (B, T)
        seq_logits, branch_logits = forward_with_branches(
            model, batch.model_inputs, batch.tpa.branch_pos, batch.tpa.branch_tok
        )
        R = batch.tpa.branch_pos.shape[1]
        assert seq_logits.shape == (B, T, model.config.get_text_config().vocab_size)
        assert branch_logits.shape == (B, R, seq_logits.shape[-1])
        assert torch.isfinite(seq_logits).all() and torch.isfinite(branch_logits).all()
        # Row layouts index real positions of the right kind.
        kd, iva, tpa = batch.kd, batch.iva, batch.tpa
        assert (batch.labels[kd.batch, kd.pos + 1] != IGNORE_INDEX).all()  # x_{t+1} is a label
        image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        assert len(iva.pos) and (batch.model_inputs["input_ids"][iva.batch, iva.pos] == image_id).all()
        branch_t = tpa.branch_pos[tpa.batch, tpa.row]
        assert (branch_t >= 0).all() and torch.equal(tpa.branch_tok[tpa.batch, tpa.row], tpa.branch_tok[tpa.branch_pos >= 0])
        assert len(set(zip(tpa.batch.tolist(), branch_t.tolist()))) == len(tpa.group.unique())
        # Saliency rows in capture's form; the student's own attention map aligns against them.
        sal = batch.saliency
        for b in range(B):
            assert sal.maps[b].shape == (len(sal.turn_rows[b]), len(sal.cols[b]))
            assert (batch.model_inputs["input_ids"][b, sal.cols[b]] == image_id).all()
            if len(sal.cols[b]):
                assert torch.allclose(sal.maps[b].sum(-1), torch.ones(1), atol=2e-3)
        with capture(model, [0], sal.rows, sal.cols) as probe:
            model(**batch.model_inputs)
        student_maps, teacher_maps = [], []
        for b in range(B):
            block = probe.block(b)
            for j, turn in enumerate(sal.turn_rows[b]):
                if len(turn) and block.shape[1]:
                    student_maps.append(block[turn].mean(0))
                    teacher_maps.append(sal.maps[b][j])
        terms = {
            "sft": L.sft_loss(seq_logits[:, :-1], batch.labels[:, 1:]),
            "kd": L.kd_loss(seq_logits[kd.batch, kd.pos], kd.ids, kd.logprobs),
            "sampled": L.sampled_kd_loss(seq_logits[kd.batch, kd.pos], kd.sampled_ids, kd.sampled_counts),
            "iva": L.iva_loss(seq_logits[iva.batch, iva.pos], iva.ids, iva.logprobs, iva.weights, group=iva.batch),
            "tpa": L.tpa_loss(branch_logits[tpa.batch, tpa.row], tpa.ids, tpa.logprobs, tpa.candidate_logprob, tpa.group),
        }
        if student_maps:
            pad = torch.nn.utils.rnn.pad_sequence
            mask = pad([torch.ones(len(m), dtype=torch.bool) for m in teacher_maps], batch_first=True)
            terms["attention"] = L.attention_kl(pad(student_maps, batch_first=True), pad(teacher_maps, batch_first=True), mask)
        for name, value in terms.items():
            assert torch.isfinite(value) and value > 0, name


def test_dataset_image_hash_mismatch_names_the_sample(store, data_file, student, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_file.parent, copy)
    write_image(copy / "img" / "4.png", 32, 32, seed=99)  # s04's image changed since the dump
    ds = _dataset(store, student[1], data_path=copy / "data.json", batch_size=10)
    with pytest.raises(StudentDataError, match=r"sample 's04': image 0 has sha256 .* but the store was dumped from"):
        list(ds)


def test_dataset_missing_record_is_named(store, student, tmp_path):
    records = json.loads(Path(StoreReader(store).manifest["dataset"]["path"]).read_text())
    short = tmp_path / "data.json"
    short.write_text(json.dumps([r for r in records if r["id"] != "s07"]))
    with pytest.raises(StudentDataError, match="sample 's07'"):
        _dataset(store, student[1], data_path=short, image_root=Path(StoreReader(store).manifest["dataset"]["path"]).parent)


# --------------------------------------------------------------------------------------------------
# the student's encoding from the store (stage2_student.data.reencode)


def assert_same_encoding(fast: EncodedSample, slow: EncodedSample) -> None:
    """Every field equal, dtypes included (independent of reencode's own comparison)."""
    sid = slow.sample_id
    assert fast.sample_id == sid
    for name in ("input_ids", "labels"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), (sid, name)
    assert fast.visual_blocks == slow.visual_blocks, sid
    assert len(fast.turns) == len(slow.turns), sid
    for j, (a, b) in enumerate(zip(fast.turns, slow.turns)):
        for name in ("instruction", "response"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), (sid, j, name)
    assert fast.image_hashes == slow.image_hashes, sid
    assert fast.model_inputs.keys() == slow.model_inputs.keys(), sid
    for key, value in slow.model_inputs.items():
        got = fast.model_inputs[key]
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), (sid, key)


def stored_signals(enc: EncodedSample) -> SampleSignals:
    """The index metadata Stage 1 stores for a teacher encoding (as teacher.py writes it, via JSON)."""
    meta = json.loads(json.dumps({
        "visual_blocks": [{"image_index": v.image_index, "start": v.start, "length": v.length, "grid": list(v.grid)}
                          for v in enc.visual_blocks],
        "turns": [{"instruction": t.instruction.tolist(), "response": t.response.tolist()} for t in enc.turns],
    }))
    empty = np.zeros((0, 1))
    return SampleSignals(enc.sample_id, enc.input_ids, meta["visual_blocks"], meta["turns"], enc.image_hashes,
                         np.zeros(0, np.int64), empty, empty, np.zeros((0, 0)), np.zeros(0, np.int64),
                         np.zeros(0), empty, empty)


@pytest.mark.parametrize("preset", ["student", "student-pooled"])
def test_fast_path_equals_encode_sample_by_sample(store, data_file, processor, family, preset, tmp_path, monkeypatch):
    from conftest import two_image_record

    _, student_proc = build_tiny_vlm(family, preset, seed=1)
    records = {r.sample_id: r for r in read_records(data_file)}
    reader = StoreReader(store)
    cases = [(unpack(reader.get(sid)), records[sid]) for sid in reader.sample_ids()]
    # Also: a system prompt and an image in the middle of the second instruction.
    extra = two_image_record(tmp_path)
    cases.append((stored_signals(encode(extra, processor, 400)), extra))
    kinds = Counter(len({b["image_index"] for b in t.visual_blocks}) for t, _ in cases)
    assert kinds[0] and kinds[1] and kinds[2]  # text only, one image, two images (tiled: several blocks each)
    assert sum(len(t.turns) >= 2 for t, _ in cases) >= len(cases) - 1  # multi-turn (all but the text-only one)
    expected = [encode(rec, student_proc, 400) for _, rec in cases]

    encoder = StudentEncoder(student_proc, 400)
    assert encoder.fast

    def no_template(*args, **kwargs):
        raise AssertionError("the fast path must not render the chat template")

    monkeypatch.setattr(student_proc, "apply_chat_template", no_template)
    for (teacher, rec), slow in zip(cases, expected):
        assert_same_encoding(encoder(teacher, rec), slow)
        assert_same_encoding(encoder(teacher, rec), slow)  # again, from the image cache


def test_check_mode_refuses_a_difference_naming_the_sample_and_field(store, data_file, student):
    records = {r.sample_id: r for r in read_records(data_file)}
    teacher = unpack(StoreReader(store).get("s03"))
    StudentEncoder(student[1], 400, mode="check")(teacher, records["s03"])  # equal: passes
    teacher.turns[1]["response"] = [p + 1 for p in teacher.turns[1]["response"]]  # tampered metadata
    with pytest.raises(IncompatibleStudentError, match=r"sample 's03'.*disagree on labels"):
        StudentEncoder(student[1], 400, mode="check")(teacher, records["s03"])


def test_processor_outside_the_fast_path_is_reencoded(store, data_file, student):
    class Wrapped:  # the student's processor behind a class the fast path does not know
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __call__(self, *args, **kwargs):
            return self._inner(*args, **kwargs)

    records = {r.sample_id: r for r in read_records(data_file)}
    teacher = unpack(StoreReader(store).get("s03"))
    encoder = StudentEncoder(Wrapped(student[1]), 400)
    assert not encoder.fast and "Wrapped is not one of the processors the fast path supports" in encoder.problem
    assert_same_encoding(encoder(teacher, records["s03"]), encode(records["s03"], student[1], 400))
    with pytest.raises(IncompatibleStudentError, match="'check' needs the fast path, but Wrapped"):
        StudentEncoder(Wrapped(student[1]), 400, mode="check")


def test_fast_path_refuses_missing_metadata_naming_the_sample(store, data_file, student):
    records = {r.sample_id: r for r in read_records(data_file)}
    stored = StoreReader(store).get("s03")
    encoder = StudentEncoder(student[1], 400)
    teacher = unpack(stored)
    teacher.visual_blocks = [{k: v for k, v in b.items() if k != "length"} for b in teacher.visual_blocks]
    with pytest.raises(StoreFormatError, match=r"sample 's03'.*lacks 'length'"):
        encoder(teacher, records["s03"])
    teacher = unpack(stored)
    teacher.turns = [{"instruction": t["instruction"]} for t in teacher.turns]
    with pytest.raises(StoreFormatError, match=r"sample 's03'.*lacks 'response'"):
        encoder(teacher, records["s03"])
    del stored.meta["turns"]
    with pytest.raises(StoreFormatError, match=r"sample 's03'.*no 'turns' column"):
        unpack(stored)


def test_fast_path_over_length_names_the_sample(store, data_file, student):
    records = {r.sample_id: r for r in read_records(data_file)}
    teacher = unpack(StoreReader(store).get("s00"))
    with pytest.raises(StudentDataError, match=r"sample 's00': over_length: \d+ tokens > max_length 20"):
        StudentEncoder(student[1], 20)(teacher, records["s00"])


@pytest.mark.parametrize("cache_mb", [0, 64])
def test_images_are_read_once_per_process_while_cached(store, data_file, student, monkeypatch, cache_mb):
    records = {r.sample_id: r for r in read_records(data_file)}
    reader = StoreReader(store)
    teachers = [unpack(reader.get(sid)) for sid in reader.sample_ids()]
    loads = Counter()
    real = Record.load

    def counting(self):
        loads[self.sample_id] += 1
        return real(self)

    monkeypatch.setattr(Record, "load", counting)
    encoder = StudentEncoder(student[1], 400, image_cache_bytes=cache_mb * 2**20)
    for _ in range(3):
        for t in teachers:
            encoder(t, records[t.sample_id])
    with_images = {t.sample_id for t in teachers if t.image_hashes}
    assert set(loads) == {t.sample_id for t in teachers}
    if cache_mb:  # read (and checked against the store) once, then served from the cache
        assert set(loads.values()) == {1} and len(encoder.cache) == len({h for t in teachers for h in t.image_hashes})
    else:  # nothing kept: every encoding reads its images again
        assert all(loads[s] == 3 for s in with_images) and len(encoder.cache) == 0
    assert encoder.cache.bytes <= cache_mb * 2**20


def test_dataset_repeat_streams_the_epochs_in_order_any_workers(store, student):
    ds = _dataset(store, student[1])  # 10 samples in batches of 3: 4 batches an epoch
    epochs = []
    for e in (1, 2, 3):
        ds.set_epoch(e)
        epochs.append(list(ds))
    expected = epochs[0][1:] + epochs[1] + epochs[2]  # resumed at (1, 1): 3 batches left, odd for 2 workers
    for workers in (0, 2):
        stream = iter(DataLoader(_dataset(store, student[1], start=(1, 1), repeat=True), batch_size=None,
                                 num_workers=workers))
        got = [next(stream) for _ in range(len(expected))]
        assert [b.position for b in got] == [(1, 1), (1, 2), (1, 3)] + [(e, i) for e in (2, 3) for i in range(4)]
        assert_same_batches(got, expected)


def test_packed_batch_is_one_buffer_with_the_same_values(store, student):
    batch = next(iter(_dataset(store, student[1])))
    one = packed(batch)
    assert_same_batches([one], [batch])
    tensors = [v for v in _fields(one).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 10 and len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert len({t.untyped_storage().data_ptr() for v in _fields(batch).values() if isinstance(v, torch.Tensor)
                for t in [v]}) > 1


# --------------------------------------------------------------------------------------------------
# the on-disk pixel cache (stage2_student.data.pixel_cache) behind the student's encoding


def _no_image_reads(monkeypatch) -> None:
    """Make every image file read fail (in this process and in forked DataLoader workers)."""
    def refuse(self):
        raise AssertionError(f"sample {self.sample_id!r}: an image file was read")

    monkeypatch.setattr(Record, "load", refuse)


def _count_image_reads(monkeypatch) -> Counter:
    """Image file reads of this process, by sample id."""
    reads, real = Counter(), Record.load

    def counting(self):
        reads[self.sample_id] += 1
        return real(self)

    monkeypatch.setattr(Record, "load", counting)
    return reads


def _stored_cases(store, data_file):
    records = {r.sample_id: r for r in read_records(data_file)}
    reader = StoreReader(store)
    return [(unpack(reader.get(sid)), records[sid]) for sid in reader.sample_ids()]


@pytest.mark.parametrize("preset", ["student", "student-pooled"])
def test_pixel_cache_serves_the_processors_exact_tensors(store, data_file, family, preset, tmp_path, monkeypatch):
    _, proc = build_tiny_vlm(family, preset, seed=1)
    cases = _stored_cases(store, data_file)
    expected = [encode(rec, proc, 400) for _, rec in cases]  # the processor on every record, fresh
    filling = StudentEncoder(proc, 400, image_cache_bytes=0, pixel_cache=PixelCache(tmp_path, proc))
    for teacher, rec in cases:
        filling(teacher, rec)
    _no_image_reads(monkeypatch)
    reading = StudentEncoder(proc, 400, image_cache_bytes=0, pixel_cache=PixelCache(tmp_path, proc))
    assert reading.pixels.stats()[0] == len({h for t, _ in cases for h in t.image_hashes})
    for (teacher, rec), slow in zip(cases, expected):
        assert_same_encoding(reading(teacher, rec), slow)  # pixel_values (and grids) bit-identical, same dtype


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_with_a_pixel_cache_reads_no_image_file_the_second_time(store, student, tmp_path, monkeypatch, workers):
    plain = list(_dataset(store, student[1]))
    cached = dict(image_cache_mb=0, pixel_cache_dir=tmp_path)  # no RAM cache: every image from disk
    first = list(DataLoader(_dataset(store, student[1], **cached), batch_size=None, num_workers=workers))
    segments = sorted(p.name for p in tmp_path.glob("*/*.pixels"))
    assert len(segments) == max(workers, 1)  # one segment per writing process
    _no_image_reads(monkeypatch)
    second = list(DataLoader(_dataset(store, student[1], **cached), batch_size=None, num_workers=workers))
    assert_same_batches(first, plain)
    assert_same_batches(second, plain)
    assert sorted(p.name for p in tmp_path.glob("*/*.pixels")) == segments  # nothing written again


def test_persistent_workers_see_each_others_pixel_cache_entries(store, student, tmp_path, monkeypatch):
    """Two worker processes fill the cache in one epoch (each sample read by at most both of them:
    prefetching workers may miss the same image at once); a loader of 2 persistent workers then
    streams three epochs, every batch, without reading one image file."""
    log = tmp_path / "reads.txt"  # shared by the worker processes (a Counter would be per process)
    real = Record.load

    def logged(self):
        with open(log, "a") as f:
            f.write(f"{self.sample_id}\n")
        return real(self)

    monkeypatch.setattr(Record, "load", logged)
    cached = dict(image_cache_mb=0, pixel_cache_dir=tmp_path / "pixels")
    first = list(DataLoader(_dataset(store, student[1], **cached), batch_size=None, num_workers=2))
    everyone = sorted(StoreReader(store).sample_ids())
    assert sorted({s for b in first for s in b.sample_ids}) == everyone
    reads = Counter(log.read_text().split())
    assert reads and set(reads) <= set(everyone) and max(reads.values()) <= 2, reads  # text-only samples read nothing
    log.unlink()

    ds = _dataset(store, student[1], repeat=True, **cached)
    stream = iter(DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True))
    batches = [next(stream) for _ in range(3 * ds.batches_this_rank)]  # three epochs
    assert sorted({s for b in batches for s in b.sample_ids}) == everyone
    assert not log.exists(), Counter(log.read_text().split())  # no image file read


def test_students_with_other_geometry_do_not_share_pixel_cache_entries(store, data_file, student, pooled, tmp_path,
                                                                     monkeypatch):
    cases = _stored_cases(store, data_file)
    for teacher, rec in cases:  # fill the cache for the student
        StudentEncoder(student[1], 400, pixel_cache=PixelCache(tmp_path, student[1]))(teacher, rec)
    other = PixelCache(tmp_path, pooled[1])
    assert other.dir != PixelCache(tmp_path, student[1]).dir and other.stats()[0] == 0
    loads = _count_image_reads(monkeypatch)
    encoder = StudentEncoder(pooled[1], 400, pixel_cache=other)
    for teacher, rec in cases:
        assert_same_encoding(encoder(teacher, rec), encode(rec, pooled[1], 400))
    assert set(loads) == {t.sample_id for t, _ in cases}  # the pooled student preprocessed its own


def test_damaged_pixel_cache_is_rebuilt_with_a_warning_naming_the_file(store, student, tmp_path, monkeypatch, caplog):
    plain = list(_dataset(store, student[1]))
    cached = dict(image_cache_mb=0, pixel_cache_dir=tmp_path)
    list(_dataset(store, student[1], **cached))
    data, = tmp_path.glob("*/*.pixels")
    lines = next(tmp_path.glob("*/*.index.jsonl")).read_text().splitlines()
    keep = 3  # entries wholly inside the truncated file
    cut = json.loads(lines[keep])["offset"] + 10
    with open(data, "r+b") as f:
        f.truncate(cut)
    reads = _count_image_reads(monkeypatch)
    with caplog.at_level("WARNING", logger="stage2.data"):
        again = list(_dataset(store, student[1], **cached))
    assert_same_batches(again, plain)
    assert f"pixel cache {data}: has {cut} bytes, short of {len(lines) - keep} entry(ies)" in caplog.text
    lost = {json.loads(line)["key"] for line in lines[keep:]}
    teachers = [unpack(StoreReader(store).get(s)) for s in StoreReader(store).sample_ids()]
    assert set(reads) == {t.sample_id for t in teachers if lost & set(t.image_hashes)}

    # Flip one byte of an entry written by the rebuild: its crc32 fails when read.
    rebuilt = next(p for p in tmp_path.glob("*/*.pixels") if p != data)
    entry = json.loads(next(p for p in tmp_path.glob("*/*.index.jsonl") if p.stem.split(".")[0] == rebuilt.stem)
                       .read_text().splitlines()[0])
    raw = bytearray(rebuilt.read_bytes())
    raw[entry["offset"] + 5] ^= 0xFF
    rebuilt.write_bytes(bytes(raw))
    caplog.clear()
    with caplog.at_level("WARNING", logger="stage2.data"):
        assert_same_batches(list(_dataset(store, student[1], **cached)), plain)
    assert f"pixel cache {rebuilt}: entry for image {entry['key'][:12]}… fails its crc32" in caplog.text


# --------------------------------------------------------------------------------------------------
# geometry: any student grid, by overlap area


@pytest.mark.parametrize(("teacher_n", "student_n"), [(4, 2), (4, 3), (27, 13), (3, 4), (5, 5), (7, 1)])
def test_axis_overlap_shares_out_every_teacher_cell(teacher_n, student_n):
    a = _axis_overlap(teacher_n, student_n)
    assert a.shape == (student_n, teacher_n) and (a >= 0).all()
    np.testing.assert_allclose(a.sum(0), 1.0, rtol=0, atol=1e-15)  # each teacher cell's length, all of it
    np.testing.assert_allclose(a.sum(1), teacher_n / student_n, rtol=0, atol=1e-12)  # each student cell's length


@pytest.mark.parametrize(("teacher", "student"), [((4, 4), (3, 3)), ((27, 27), (13, 13)), ((3, 5), (2, 4)), ((2, 2), (3, 3))])
def test_resample_preserves_mass_and_matches_a_dense_area_matrix(teacher, student):
    rng = np.random.default_rng(0)
    (R, C), (r, c) = teacher, student
    x = rng.random((3, R * C)).astype(np.float16).astype(np.float32)
    y = _resample_sum(x, teacher, student)
    np.testing.assert_allclose(y.sum(1), x.sum(1), rtol=1e-6)
    # The same map from the 2-D overlap areas, cell by cell: student cell (i, j) x teacher cell (a, b).
    w = np.zeros((r * c, R * C))
    for i in range(r):
        for j in range(c):
            for a in range(R):
                for b in range(C):
                    w[i * c + j, a * C + b] = (max(0, min((i + 1) * R / r, a + 1) - max(i * R / r, a))
                                               * max(0, min((j + 1) * C / c, b + 1) - max(j * C / c, b)))
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("teacher", "factor"), [((4, 4), (2, 2)), ((6, 4), (3, 2)), ((27, 27), (3, 3)), ((8, 6), (1, 3))])
def test_integer_pooling_is_bit_identical_to_the_area_sum(teacher, factor):
    """The general map, on an integer factor, equals the plain fr x fc area sum bit for bit (float16
    saliency summed in float64 is exact, and the overlap weights are exact zeros and ones)."""
    rng = np.random.default_rng(1)
    (R, C), (fr, fc) = teacher, factor
    x = rng.random((2, R * C)).astype(np.float16)
    area_sum = x.astype(np.float64).reshape(2, R // fr, fr, C // fc, fc).sum(axis=(-3, -1)).reshape(2, -1).astype(np.float32)
    y = _resample_sum(x, teacher, (R // fr, C // fc))
    assert y.dtype == np.float32 and np.array_equal(y, area_sum)
    ids = rng.integers(0, 50, (fr * fc, 8))
    lps = np.log(rng.dirichlet(np.ones(9), fr * fc)[:, :8]).astype(np.float32)
    unweighted = _union_mean(ids, lps, 8)
    weighted = _union_mean(ids, lps, 8, np.ones(fr * fc))
    assert all(np.array_equal(a, b) for a, b in zip(unweighted, weighted))


def test_union_mean_weights_the_rows_by_overlap():
    ids = np.array([[1, 2], [2, 3]])
    lps = np.log(np.array([[0.6, 0.4], [0.5, 0.5]]))
    out_ids, out_lp = _union_mean(ids, lps, 3, np.array([0.75, 0.25]))
    # 1: 0.75*0.6, 2: 0.75*0.4 + 0.25*0.5, 3: 0.25*0.5
    np.testing.assert_array_equal(out_ids, [1, 2, 3])
    np.testing.assert_allclose(np.exp(out_lp), [0.45, 0.425, 0.125], rtol=1e-6)


def test_remap_refuses_another_tiling_naming_both_layouts():
    teacher, enc = _hand_case()
    enc.visual_blocks = [VisualBlock(0, 2, 1, (1, 1)), VisualBlock(0, 3, 1, (1, 1))]
    enc.input_ids = np.array([10, 11, 3, 3, 12, 13])
    with pytest.raises(IncompatibleStudentError, match=r"1 image block\(s\) \(image 0: 2x4\), the student's 2 \(image 0: 1x1 \+ 1x1\)"):
        remap(teacher, enc)

"""The data layer: LLaVA records of every shape to model inputs and position sets (DESIGN.md §2).

Position sets are checked token by token against an independent segmentation done in token space:
the processor tokenizes each conversation prefix (images expanded), and message boundaries are the
prefix lengths. The module under test works in character space, so the two can disagree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BLOCKS_PER_IMAGE, two_image_record, write_image, write_json

from pipeline.data import DataConfig, SampleError, iter_encoded
from pipeline.data.encode import IGNORE_INDEX, encode, to_messages
from pipeline.data.records import BadRecord, DataSourceError, Record, Turn, read_records


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def prefix_ids(processor, record: Record, messages, k: int, gen: bool = False) -> np.ndarray:
    """Token ids of the first k messages as the processor makes them, images expanded."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    text = processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=gen)
    n_img = sum(1 for m in messages[:k] for c in m["content"] if c["type"] == "image")
    images = record.load_images()[:n_img] or None
    out = processor(text=text, images=images, return_tensors="np", add_special_tokens=False)
    return out["input_ids"][0].astype(np.int64)


def independent_segmentation(processor, record: Record):
    """(instruction positions per turn, label positions per turn) computed in token space."""
    tok = processor.tokenizer
    messages = to_messages(record)
    header_user = len(tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    skip = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    instr, labels = [], []
    for k, m in enumerate(messages):
        a, b = len(prefix_ids(processor, record, messages, k)), len(prefix_ids(processor, record, messages, k + 1))
        ids = prefix_ids(processor, record, messages, k + 1)
        if m["role"] == "user":
            pos = [p for p in range(a + header_user, b) if ids[p] not in skip and tok.decode([ids[p]]).strip()]
            instr.append(pos)
        elif m["role"] == "assistant":
            g = len(prefix_ids(processor, record, messages, k, gen=True))
            pos = list(range(g, b))
            while pos and not tok.decode([ids[pos[-1]]]).strip():  # trailing newline after <|im_end|>
                pos.pop()
            labels.append(pos)
    return instr, labels


def check_against_independent(processor, record: Record, enc) -> None:
    instr, labels = independent_segmentation(processor, record)
    assert len(enc.turns) == len(labels)
    for j, turn in enumerate(enc.turns):
        assert turn.instruction.tolist() == instr[j], f"turn {j} instruction positions"
        assert (turn.response + 1).tolist() == labels[j], f"turn {j} label positions"
    expected_labels = np.full(enc.length, IGNORE_INDEX)
    for pos in labels:
        expected_labels[pos] = enc.input_ids[pos]
    np.testing.assert_array_equal(enc.labels, expected_labels)
    full = prefix_ids(processor, record, to_messages(record), len(record.turns))
    np.testing.assert_array_equal(enc.input_ids, full)


def test_text_only_single_turn(processor):
    rec = Record("t", [Turn("user", "Is there a red circle?"), Turn("assistant", "yes")])
    enc = encode(rec, processor, 512)
    tok = processor.tokenizer
    assert enc.visual_blocks == [] and enc.visual_positions.size == 0
    assert tok.decode(enc.input_ids[enc.turns[0].instruction]) == "Is there a red circle?"
    assert tok.decode(enc.input_ids[enc.turns[0].response + 1]) == "yes<|im_end|>"
    # response positions are contiguous and end right before the newline that closes the turn
    r = enc.turns[0].response
    assert np.all(np.diff(r) == 1) and r[-1] + 1 == enc.length - 2
    assert np.array_equal(np.flatnonzero(enc.labels != IGNORE_INDEX), r + 1)
    check_against_independent(processor, rec, enc)


def test_multi_turn_multi_image_with_tags_anywhere(processor, family, tmp_path):
    rec = two_image_record(tmp_path)
    enc = encode(rec, processor, 1024)
    tok, img = processor.tokenizer, image_token_id(processor)
    # visual blocks: in order, contiguous runs of the image token, nothing else is an image token
    # (a tiled image: one block per tile and one for its global image, all with its index)
    n = BLOCKS_PER_IMAGE[family]
    assert [blk.image_index for blk in enc.visual_blocks] == [0] * n + [1] * n
    vis = enc.visual_positions
    assert np.all(enc.input_ids[vis] == img)
    assert int((enc.input_ids == img).sum()) == vis.size
    for blk in enc.visual_blocks:
        assert blk.grid[0] * blk.grid[1] == blk.length
    # the second image sits inside turn 2's instruction, between its words
    t2 = enc.turns[1].instruction
    second = [blk for blk in enc.visual_blocks if blk.image_index == 1]
    assert t2.min() < second[0].start and second[-1].start + second[-1].length - 1 < t2.max()
    assert tok.decode(enc.input_ids[enc.turns[0].instruction]) == "What colour is the shape at the top left?"
    assert tok.decode(enc.input_ids[enc.turns[1].response + 1]) == "the first one<|im_end|>"
    # instructions never include visual positions; system text is in no turn
    assert not set(enc.instruction_positions) & set(vis)
    assert "helpful" not in tok.decode(enc.input_ids[enc.instruction_positions])
    assert len(enc.image_hashes) == 2 and enc.image_hashes[0] != enc.image_hashes[1]
    check_against_independent(processor, rec, enc)


def test_grid_shapes_follow_the_family(processor, family, tmp_path):
    wide = write_image(tmp_path / "wide.png", 32, 48)
    rec = Record("g", [Turn("user", "<image>\nDescribe."), Turn("assistant", "shapes")], [wide])
    enc = encode(rec, processor, 512)
    tok = processor.tokenizer
    if family in ("idefics3", "internvl"):  # tiled: one square 4x4 block per 16-px tile, global image last
        assert [blk.grid for blk in enc.visual_blocks] == [(4, 4)] * BLOCKS_PER_IMAGE[family]
        assert all(blk.image_index == 0 for blk in enc.visual_blocks)
        starts = [blk.start for blk in enc.visual_blocks]
        if family == "idefics3":  # 32x48 px -> 32x32 -> 2x2 tiles, each after its tag, then the global image
            tags = [tok.convert_ids_to_tokens(int(enc.input_ids[s - 1])) for s in starts]
            assert tags == ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>", "<global-img>"]
            assert all(tok.convert_ids_to_tokens(int(enc.input_ids[s - 2])) == "<fake_token_around_image>" for s in starts)
            assert enc.model_inputs["pixel_values"].shape[:2] == (1, 5)
        else:  # wider than tall: 2 columns x 1 row of tiles, then the thumbnail, one run in <img> ... </img>
            assert np.diff(starts).tolist() == [16, 16]
            assert tok.convert_ids_to_tokens(int(enc.input_ids[starts[0] - 1])) == "<img>"
            assert tok.convert_ids_to_tokens(int(enc.input_ids[starts[-1] + 16])) == "</img>"
            assert enc.model_inputs["pixel_values"].shape[0] == 3
        return
    (blk,) = enc.visual_blocks
    if family == "llava":  # resized to a fixed square: (32/8)^2
        assert blk.grid == (4, 4)
    else:  # Qwen2-VL keeps the aspect ratio: 32x48 px, 8 px per merged token
        thw = enc.model_inputs["image_grid_thw"][0].tolist()
        assert blk.grid == (thw[1] // 2, thw[2] // 2) == (4, 6)


def test_trailing_question_without_answer_is_not_a_turn(processor):
    rec = Record("q", [Turn("user", "Hi"), Turn("assistant", "yes"), Turn("user", "Again?")])
    enc = encode(rec, processor, 512)
    assert len(enc.turns) == 1


@pytest.mark.parametrize(
    "record, reason",
    [
        (Record("e", [Turn("user", "Hi"), Turn("assistant", "  ")]), "no_response"),
        (Record("n", [Turn("user", "Hi")]), "no_response"),
        (Record("m", [Turn("user", "<image> and <image>"), Turn("assistant", "a")], []), "image_tag_mismatch"),
    ],
)
def test_bad_records_raise_typed_errors(processor, record, reason):
    with pytest.raises(SampleError) as e:
        encode(record, processor, 512)
    assert e.value.reason == reason and e.value.sample_id == record.sample_id


def test_bad_record_matrix_from_a_file_keeps_the_good_ones(processor, tmp_path):
    write_image(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png at all")
    long_q = " ".join(["red circle"] * 400)
    records = [
        {"id": "ok", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "tags", "image": "ok.png", "conversations": [{"from": "human", "value": "<image><image>Q?"}, {"from": "gpt", "value": "A"}]},
        {"id": "untagged", "image": "ok.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
        {"id": "empty", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": ""}]},
        {"id": "long", "conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "A"}]},
        {"id": "order", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q?"}]},
        {"id": "speaker", "conversations": [{"from": "robot", "value": "Q?"}]},
        {"id": "ok", "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "A"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
    ]
    path = write_json(tmp_path / "data.json", records)
    cfg = DataConfig(path=str(path), image_root=str(tmp_path / "img"), max_length=256)
    out = list(iter_encoded(cfg, processor))
    assert len(out) == len(records)  # nothing silently dropped
    got = {(o.sample_id, o.reason if isinstance(o, SampleError) else "ok") for o in out}
    assert got == {
        ("ok", "ok"),
        ("missing", "missing_image"),
        ("corrupt", "corrupt_image"),
        ("tags", "image_tag_mismatch"),
        ("untagged", "image_tag_mismatch"),
        ("empty", "no_response"),
        ("long", "over_length"),
        ("order", "malformed_record"),
        ("speaker", "malformed_record"),
        ("ok", "malformed_record"),  # the duplicate id
        ("text", "ok"),
    }
    details = {o.sample_id: o.detail for o in out if isinstance(o, SampleError)}
    assert "nope.png" in details["missing"] and "corrupt.png" in details["corrupt"]
    assert "2 <image> tag(s) but 1 image(s)" in details["tags"]


def test_jsonl_image_lists_and_bad_lines(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "sub" / "b.png")
    conv = [{"from": "human", "value": "<image><image>Q"}, {"from": "gpt", "value": "A"}]
    path = write_json(tmp_path / "d.jsonl", [{"id": "x", "image": ["a.png", "sub/b.png"], "conversations": conv}], jsonl=True)
    with path.open("a") as f:
        f.write("{broken json\n\n")
        f.write(json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}) + "\n")
    out = list(read_records(path))
    assert isinstance(out[0], Record) and out[0].images == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert isinstance(out[1], BadRecord) and out[1].error.reason == "malformed_record" and "d.jsonl:2" in out[1].error.detail
    assert isinstance(out[2], Record) and out[2].sample_id == "row-3" and out[2].images == []


def test_data_source_errors(tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        list(read_records(tmp_path / "missing.json"))
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataSourceError, match="expected a JSON list"):
        list(read_records(tmp_path / "obj.json"))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataSourceError, match="bad.json: not valid JSON"):
        list(read_records(tmp_path / "bad.json"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataSourceError, match="expected a .json or .jsonl"):
        list(read_records(tmp_path / "x.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataSourceError, match="not a dataset directory"):
        list(read_records(tmp_path / "emptydir"))


def _llava_fixture(tmp_path):
    write_image(tmp_path / "a.png", seed=3)
    write_image(tmp_path / "b.png", seed=4)
    return [
        {"id": "s0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "s1", "image": "b.png", "conversations": [{"from": "human", "value": "How many? <image>"}, {"from": "gpt", "value": "2"}]},
    ]


def test_hf_save_to_disk_matches_llava_json(processor, tmp_path):
    import datasets

    records = _llava_fixture(tmp_path)
    llava = [encode(r, processor, 512) for r in read_records(write_json(tmp_path / "d.json", records))]
    ds = datasets.Dataset.from_dict(
        {
            "id": [r["id"] for r in records],
            "image": [str(tmp_path / r["image"]) for r in records],
            "conversations": [json.dumps(r["conversations"]) for r in records],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    hf = [encode(r, processor, 512) for r in read_records(tmp_path / "hf")]
    assert [e.sample_id for e in hf] == ["s0", "s1"]
    for x, y in zip(llava, hf):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.labels, y.labels)


def test_hf_imagefolder(processor, family, tmp_path):
    records = _llava_fixture(tmp_path / "folder")
    meta = [{"file_name": r["image"], "id": r["id"], "conversations": r["conversations"]} for r in records]
    write_json(tmp_path / "folder" / "metadata.jsonl", meta, jsonl=True)
    out = list(read_records(tmp_path / "folder"))
    assert all(isinstance(r, Record) for r in out)
    assert sorted(r.sample_id for r in out) == ["s0", "s1"]
    encs = [encode(r, processor, 512) for r in out]
    assert all(len(e.visual_blocks) == BLOCKS_PER_IMAGE[family] for e in encs)


def test_limit_and_config_validation(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="max_length"):
        DataConfig(path="x.json", max_length=0)
    with pytest.raises(ConfigError, match="limit"):
        DataConfig(path="x.json", limit=0)


def test_dataset_image_bytes_that_are_no_image_cost_one_record(tmp_path):
    """Image bytes inside a dataset row (a Hugging Face `Image` column) are checked per record: bytes
    that are no image, or too many, make that record's error, never the whole read's; a lazily
    decoded image that turns out truncated fails its own load as corrupt_image."""
    import io

    from PIL import Image

    from pipeline.data.records import CORRUPT_IMAGE, IMAGE_TOO_LARGE, ImagePolicy, _record_from_hf

    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]
    with pytest.raises(SampleError) as bad:
        _record_from_hf({"id": "x", "conversations": conv, "image": {"bytes": b"not an image"}}, 0, tmp_path, "d:0")
    assert bad.value.reason == CORRUPT_IMAGE and "d:0" in bad.value.detail
    with pytest.raises(SampleError) as big:
        _record_from_hf({"id": "y", "conversations": conv, "image": {"bytes": b"\0" * 64}}, 1, tmp_path, "d:1",
                        ImagePolicy(max_image_bytes=32))
    assert big.value.reason == IMAGE_TOO_LARGE
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    truncated = _record_from_hf({"id": "z", "conversations": conv, "image": {"bytes": png.getvalue()[:400]}}, 2, tmp_path, "d:2")
    with pytest.raises(SampleError) as cut:
        truncated.load()
    assert cut.value.reason == CORRUPT_IMAGE and cut.value.sample_id == "z"

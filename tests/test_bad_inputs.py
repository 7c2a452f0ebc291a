"""Bad inputs through the released commands: ``data-check``, ``teacher-dump`` (shards small enough
that duplicate ids fall in one shard and in two), ``verify``, a re-run and ``distill``. Every bad
record is skipped with its reason, everything good is kept, the store is valid. Then the data
layer's defences one at a time (image limits, special files, paths out of the image root, text
that is not UTF-8, sample ids, 16-bit and EXIF-rotated images).

The fixture set is ``tests/bad_inputs.py``; its cases are listed there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from bad_inputs import exif_rotated_jpeg, gray16_png, png_header_only, write_bad_inputs
from conftest import write_image, write_json
from test_distill import distill_config
from test_dump import dump_config

from pipeline.config import ConfigError, save_config
from pipeline.data import DataConfig, DataSourceError, ImagePolicy, Record, SampleError, iter_records, read_records
from pipeline.data.records import BadRecord, Turn
from pipeline.tools.cli import main
from pipeline.tools.inspect_store import verify
from pipeline.tools.tiny import save_tiny_vlm
from schemas import StoreReader

SHARD_SIZE = 4
# The tests on the dumped set share one dump of it by the tiny teacher (about 10 s on 2 cores).
slow = pytest.mark.slow
TURNS = [Turn("user", "<image>\nWhat is shown?"), Turn("assistant", "shapes")]


def overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_bad_inputs(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("teacher"), "llava", "teacher")


def dump_cfg(inputs, teacher_dir: Path, out: Path):
    return dump_config(teacher_dir, inputs.data, out, **{"output.shard_size": SHARD_SIZE, **inputs.overrides})


@pytest.fixture(scope="module")
def store(inputs, teacher_dir, tmp_path_factory) -> Path:
    """The set dumped by ``pipeline run teacher-dump``."""
    out = tmp_path_factory.mktemp("store") / "store"
    path = out.parent / "dump.yaml"
    save_config(dump_cfg(inputs, teacher_dir, out), path)
    assert main(["run", "teacher-dump", "--config", str(path)]) == 0
    return out


# ------------------------------------------------------------------------------- the commands


def test_the_set_puts_duplicates_in_one_shard_and_in_two(inputs):
    shards = [(e.line - 1) // SHARD_SIZE for e in inputs.expected if e.sample_id == "dup"]
    assert len(shards) == 3 and shards[0] == shards[1] and shards[2] > shards[0]


def test_data_check_reports_every_bad_record_with_its_reason(inputs, teacher_dir, tmp_path, capsys):
    report = tmp_path / "report.json"
    values = {"model": str(teacher_dir), "data.path": str(inputs.data), "data.max_length": 400, "report": str(report)}
    assert main(["run", "data-check", *overrides({**values, **inputs.overrides})]) == 0
    assert "Traceback" not in capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["samples_ok"] == len(inputs.good)
    assert r["samples_skipped"] == len(inputs.bad)
    for got, want in zip(r["skipped"], inputs.bad, strict=True):  # both in the file's order
        assert (got["sample_id"], got["reason"]) == (want.sample_id, want.reason), want
        assert want.detail in got["detail"], (want, got)


@slow
def test_teacher_dump_skips_each_bad_record_and_keeps_every_good_one(inputs, store):
    reader = StoreReader(store)
    assert sorted(reader.sample_ids()) == sorted(e.sample_id for e in inputs.good)
    skipped = {s.sample_id: s for s in reader.skipped()}
    assert sorted(skipped) == sorted(e.store_id for e in inputs.bad)  # one skip record each, ids unique
    for want in inputs.bad:
        got = skipped[want.store_id]
        assert got.reason == want.reason and want.detail in got.detail, (want, got)
        assert got.shard == f"shard-{(want.line - 1) // SHARD_SIZE:05d}"
    assert verify(store) == []


@slow
def test_verify_command_passes_on_the_dump(store, capsys):
    assert main(["verify", str(store)]) == 0


@slow
def test_a_rerun_resumes_cleanly(inputs, teacher_dir, store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    # As if the first run died while writing shard 0 (the one holding a duplicate) and the last.
    (copy / "manifest.json").unlink()
    shards = sorted((copy / "shards").iterdir())
    for shard in (shards[0], shards[-1]):
        shard.rename(shard.with_name(shard.name + ".partial"))
    cfg = dump_cfg(inputs, teacher_dir, copy)
    path = tmp_path / "dump.yaml"
    save_config(cfg, path)
    assert main(["run", "teacher-dump", "--config", str(path)]) == 0
    assert verify(copy) == []
    a, b = StoreReader(store), StoreReader(copy)
    assert a.sample_ids() == b.sample_ids()
    assert sorted((s.sample_id, s.reason) for s in a.skipped()) == sorted((s.sample_id, s.reason) for s in b.skipped())
    assert main(["run", "teacher-dump", "--config", str(path)]) == 0  # complete: nothing to do


@slow
def test_distill_trains_on_the_dump(store, tmp_path):
    student = save_tiny_vlm(tmp_path / "student", "llava", "student", seed=1)
    out = tmp_path / "run"
    cfg = distill_config(store, out, {"path": str(student)}, **{"train.steps": 3})
    path = tmp_path / "distill.yaml"
    save_config(cfg, path)
    assert main(["run", "distill", "--config", str(path)]) == 0
    log = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["total"]) for r in log)


def test_distill_reads_images_under_the_policy_of_the_store(teacher_dir, tmp_path):
    """A store dumped with data.allow_outside_root: true trains: Stage 2 reads its images as Stage 1 did."""
    from pipeline.processors import load_processor
    from stage1_teacher.dump import run as dump
    from stage2_student.data.dataset import StoreDataset

    write_image(tmp_path / "elsewhere" / "a.png", seed=1)
    write_image(tmp_path / "elsewhere" / "b.png", seed=2)
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "shapes"}]
    records = [{"id": n, "image": f"../elsewhere/{n}.png", "conversations": conv} for n in "ab"]
    data = write_json(tmp_path / "data" / "d.json", records)
    out = tmp_path / "store"
    dump(dump_config(teacher_dir, data, out, **{"data.allow_outside_root": True, "signals.saliency_layers": [0]}))
    assert StoreReader(out).sample_ids() == ["a", "b"]
    batches = list(StoreDataset(out, load_processor(teacher_dir), batch_size=2))
    assert len(batches) == 1


def test_whole_inputs_are_refused_naming_them(inputs, teacher_dir, tmp_path, capsys):
    for name, refusal in inputs.refusals.items():
        values = {"model": str(teacher_dir), "data.path": str(refusal.path)}
        assert main(["run", "data-check", *overrides(values)]) == 2, name
        err = capsys.readouterr().err
        assert str(refusal.path) in err and refusal.message in err and "Traceback" not in err, err


# ---------------------------------------------------------------------- the data layer, one by one


def _load(record: Record):
    try:
        return record.load()
    except SampleError as e:
        return e


def test_image_over_the_pixel_limit_is_skipped_before_decoding(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))  # over Pillow's own guard too
    (tmp_path / "big.png").write_bytes(png_header_only(9000, 9000))
    for name in ("bomb.png", "big.png"):
        e = _load(Record("x", TURNS, [tmp_path / name], image_root=tmp_path))
        assert isinstance(e, SampleError) and e.reason == "image_too_large" and name in e.detail, e
    write_image(tmp_path / "ok.png", 40, 50)
    e = _load(Record("x", TURNS, [tmp_path / "ok.png"], policy=ImagePolicy(max_image_pixels=1999)))
    assert e.reason == "image_too_large" and "50x40 pixels, over data.max_image_pixels=1999" in e.detail
    # the configured limit decides, not Pillow's process-wide guard (here refusing above 2 x 500)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    images, _ = Record("x", TURNS, [tmp_path / "ok.png"], policy=ImagePolicy(max_image_pixels=2000)).load()
    assert images[0].size == (50, 40)


# Loads one image in a child process whose memory and time are bounded, so that reading /dev/zero
# or a FIFO fails this test rather than the machine.
_CHILD = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from pipeline.data.records import ImagePolicy, Record, SampleError, Turn
rec = Record("x", [Turn("user", "<image>"), Turn("assistant", "a")], [Path(sys.argv[1])],
             image_root=Path(sys.argv[2]), policy=ImagePolicy(max_image_bytes=int(sys.argv[3]), allow_outside_root=True))
try:
    rec.load()
    print("loaded")
except SampleError as e:
    print(e.reason, e.detail)
"""


def _load_in_child(path: Path, root: Path, max_bytes: int = 1 << 20) -> str:
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(root), str(max_bytes)],
                             capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    except subprocess.TimeoutExpired:
        return "timed out"
    return out.stdout.strip() or out.stderr[-500:]


def test_only_regular_files_are_read_with_a_size_limit(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dir.png").mkdir()
    write_image(tmp_path / "big.png", 64, 64)  # about 12 kB of noise
    assert _load_in_child(Path("/dev/zero"), tmp_path).startswith("missing_image image 0 is a character device")
    assert _load_in_child(tmp_path / "fifo.png", tmp_path).startswith("missing_image image 0 is a FIFO")
    assert _load_in_child(tmp_path / "dir.png", tmp_path).startswith("missing_image image 0 is a directory")
    assert "over data.max_image_bytes=1000" in _load_in_child(tmp_path / "big.png", tmp_path, 1000)
    assert _load_in_child(tmp_path / "big.png", tmp_path) == "loaded"


def test_paths_out_of_the_image_root_are_refused_unless_allowed(tmp_path):
    import os

    root = tmp_path / "root"
    write_image(tmp_path / "out.png")
    write_image(root / "in.png")
    os.symlink(tmp_path / "out.png", root / "link.png")
    os.symlink(root / "in.png", root / "link-in.png")
    data = write_json(tmp_path / "d.json", [
        {"id": name, "image": image, "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}
        for name, image in [("dotdot", "../out.png"), ("absolute", str(tmp_path / "out.png")), ("link", "link.png"),
                            ("inside", "in.png"), ("link-in", "link-in.png"), ("dotdot-in", "x/../in.png")]
    ])
    for allow in (False, True):
        cfg = DataConfig(path=str(data), image_root=str(root), allow_outside_root=allow)
        reasons = {}
        for rec in iter_records(cfg):
            e = _load(rec)
            reasons[rec.sample_id] = e.reason if isinstance(e, SampleError) else "ok"
        out = "ok" if allow else "image_outside_root"
        assert reasons == {"dotdot": out, "absolute": out, "link": out, "inside": "ok", "link-in": "ok", "dotdot-in": "ok"}
    # eval has the same key
    from stage2_student.evaluate import EvalDataConfig, read_question_file

    for allow in (False, True):
        policy = ImagePolicy.from_settings(vars(EvalDataConfig(path=str(data), allow_outside_root=allow)))
        records, _, _ = read_question_file(data, str(root), None, policy)
        loaded = [r.sample_id for r in records if not isinstance(_load(r), SampleError)]
        assert loaded == (["dotdot", "absolute", "link"] if allow else []) + ["inside", "link-in", "dotdot-in"]


def test_text_that_is_not_utf8_names_the_file_and_costs_one_line(tmp_path):
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataSourceError, match="latin1.json: not UTF-8"):
        list(read_records(tmp_path / "latin1.json"))
    conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    lines = [json.dumps({"id": "a", "conversations": conv}).encode(),
             '{"id": "caf\xe9", "conversations": []}'.encode("latin-1"),
             json.dumps({"id": "b", "conversations": conv}).encode()]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = list(read_records(tmp_path / "d.jsonl"))
    assert [type(r).__name__ for r in out] == ["Record", "BadRecord", "Record"]
    assert out[1].error.reason == "malformed_record" and "d.jsonl:2: not UTF-8" in out[1].error.detail
    # eval reads the same file (and its raw records for the answers) without dying on the line
    from stage2_student.evaluate import read_question_file

    records, raws, skipped = read_question_file(tmp_path / "d.jsonl", None, None)
    assert [r.sample_id for r in records] == ["a", "b"] and set(raws) == {"a", "b"} and len(skipped) == 1


def test_sample_ids_are_unique_and_checked_per_record(tmp_path):
    conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    rows = [{"id": i, "conversations": conv} for i in
            ["a", "a", "", "  ", 1.5, True, [1], 7, "7", None, "row-9", "a@d.jsonl:2", "a"]]
    rows.append({"id": "a", "conversations": "broken"})  # a bad record whose id is taken
    out = list(read_records(write_json(tmp_path / "d.jsonl", rows, jsonl=True)))
    got = [(r.sample_id, "ok", r.sample_id) if isinstance(r, Record) else (r.error.sample_id, r.error.reason, r.error.skip_id)
           for r in out]
    assert got == [
        ("a", "ok", "a"),
        ("a", "malformed_record", "a@d.jsonl:2"),
        ("@d.jsonl:3", "malformed_record", "@d.jsonl:3"),
        ("@d.jsonl:4", "malformed_record", "@d.jsonl:4"),
        ("@d.jsonl:5", "malformed_record", "@d.jsonl:5"),
        ("@d.jsonl:6", "malformed_record", "@d.jsonl:6"),
        ("@d.jsonl:7", "malformed_record", "@d.jsonl:7"),
        ("7", "ok", "7"),
        ("7", "malformed_record", "7@d.jsonl:9"),
        ("row-9", "ok", "row-9"),
        ("row-9", "malformed_record", "row-9@d.jsonl:11"),
        ("a@d.jsonl:2", "malformed_record", "a@d.jsonl:2@d.jsonl:12"),
        ("a", "malformed_record", "a@d.jsonl:13"),
        ("a", "malformed_record", "a@d.jsonl:14"),
    ]
    details = [r.error.detail for r in out if isinstance(r, BadRecord)]
    assert "duplicate sample id 'a', already the id of the record at d.jsonl:1" in details[0]
    assert "empty sample id" in details[1] and "found float 1.5" in details[3] and "found bool True" in details[4]
    assert "already the id of the record at d.jsonl:8" in details[6]
    assert "conversations" in details[-1]  # a bad record keeps its own reason under a free key
    skip_ids = [r.error.skip_id for r in out if isinstance(r, BadRecord)]
    stored = [r.sample_id for r in out if isinstance(r, Record)]
    assert len(set(skip_ids + stored)) == len(out)  # what a store is keyed by: unique


def test_16bit_png_is_scaled_and_exif_rotation_applied(tmp_path):
    gray16_png(tmp_path / "g.png", value=32768)
    exif_rotated_jpeg(tmp_path / "e.jpg", w=48, h=32)
    (gray, rotated), _ = Record("x", TURNS, [tmp_path / "g.png", tmp_path / "e.jpg"]).load()
    assert gray.mode == "RGB" and np.asarray(gray).min() == np.asarray(gray).max() == 128  # 32768 / 257
    assert rotated.size == (32, 48)


def test_image_limits_are_validated_config_keys():
    with pytest.raises(ConfigError, match="max_image_pixels"):
        DataConfig(path="x.json", max_image_pixels=0)
    with pytest.raises(ConfigError, match="max_image_bytes"):
        DataConfig(path="x.json", max_image_bytes=0)
    assert ImagePolicy.from_settings({"max_image_bytes": 5, "path": "x"}) == ImagePolicy(max_image_bytes=5)

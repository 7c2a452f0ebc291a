"""Stage 1 end to end: `pipeline run teacher-dump` on tiny teachers, checked against independent
computations (plain forwards, eager attention), across workers, batch sizes, crashes and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BLOCKS_PER_IMAGE, corrupt_chunk, write_image, write_json
from transformers import AutoModelForImageTextToText

from pipeline.tools.cli import main
from pipeline.config import load_config
from pipeline.data import DataConfig, iter_encoded
from pipeline.tools.inspect_store import verify
from pipeline.processors import load_processor
from schemas import StoreReader
from schemas.signals import unpack
from stage1_teacher.config import DumpConfig
from stage1_teacher.dump import StoreMismatchError, run

QUESTIONS = ["What colour is the shape at the top left?", "How many shapes are there?", "Is there a red circle?"]


def make_dataset(root: Path, n: int = 10, bad: bool = False) -> Path:
    """n multi-turn samples (one or two images, one text-only) plus, optionally, one of each bad kind."""
    records = []
    for i in range(n):
        write_image(root / "img" / f"{i}.png", 32, 32 + 16 * (i % 2), seed=i)
        conv = [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i % 3]}"},
            {"from": "gpt", "value": ["red", "3", "yes"][i % 3]},
            {"from": "human", "value": QUESTIONS[(i + 1) % 3]},
            {"from": "gpt", "value": "the blue one"},
        ]
        rec = {"id": f"s{i:02d}", "image": f"img/{i}.png", "conversations": conv}
        if i == 3:  # two images, the second inside the second turn
            rec["image"] = [f"img/{i}.png", "img/0.png"]
            conv[2]["value"] = "Compare with <image> please."
        if i == 5:  # text-only
            rec = {"id": "s05", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
        records.append(rec)
    if bad:
        (root / "img" / "corrupt.png").write_bytes(b"garbage")
        q = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]
        records += [
            {"id": "bad-missing", "image": "img/none.png", "conversations": q},
            {"id": "bad-corrupt", "image": "img/corrupt.png", "conversations": q},
            {"id": "bad-long", "conversations": [{"from": "human", "value": "red " * 600}, {"from": "gpt", "value": "A"}]},
            {"id": "bad-noresp", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": ""}]},
        ]
    return write_json(root / "data.json", records)


def dump_config(teacher: Path, data: Path, out: Path, **over) -> DumpConfig:
    overrides = {
        "teacher.path": str(teacher),
        "data.path": str(data),
        "data.max_length": 400,
        "output.dir": str(out),
        "output.shard_size": 4,
        "signals.top_k": 16,
        "signals.calibration_samples": 6,
        "signals.sampled.enabled": True,
        "signals.sampled.draws": 20,
        # a random-init teacher is nearly uniform: admit every candidate so transitions exist
        "signals.transitions.min_prob": 0.0,
        "signals.transitions.min_alt_mass": 0.0,
        "signals.transitions.max_positions": 6,
        "signals.transitions.candidates": 2,
        "batch_size": 3,
        **over,
    }
    return load_config(DumpConfig, None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n=10, bad=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, dataset) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    run(dump_config(tiny_teacher_dir, dataset, out))
    return out


def read_all(store: Path) -> dict:
    reader = StoreReader(store)
    return {sid: reader.get(sid) for sid in reader.sample_ids()}


def assert_same_store(a: Path, b: Path, atol: float = 0.0) -> None:
    sa, sb = read_all(a), read_all(b)
    assert list(sa) == list(sb)
    for sid in sa:
        assert sa[sid].meta == sb[sid].meta, sid
        assert sa[sid].arrays.keys() == sb[sid].arrays.keys()
        for name in sa[sid].arrays:
            x, y = sa[sid].arrays[name], sb[sid].arrays[name]
            if np.issubdtype(x.dtype, np.integer):
                np.testing.assert_array_equal(x, y, err_msg=f"{sid}/{name}")
            else:
                np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=f"{sid}/{name}")
    ska = sorted((r.sample_id, r.reason) for r in StoreReader(a).skipped())
    assert ska == sorted((r.sample_id, r.reason) for r in StoreReader(b).skipped())


def teacher_and_samples(teacher_dir: Path, data: Path):
    model = AutoModelForImageTextToText.from_pretrained(teacher_dir).eval()
    processor = load_processor(teacher_dir)
    encoded = {e.sample_id: e for e in iter_encoded(DataConfig(path=str(data), max_length=400), processor) if hasattr(e, "input_ids")}
    return model, processor, encoded


def test_store_verifies_and_records_bad_samples(store):
    assert verify(store) == []
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["n_samples"] == 10
    assert manifest["skipped_reasons"] == {"corrupt_image": 1, "missing_image": 1, "no_response": 1, "over_length": 1}
    skipped = {r.sample_id: r for r in StoreReader(store).skipped()}
    assert "none.png" in skipped["bad-missing"].detail
    text_only = unpack(StoreReader(store).get("s05"))
    assert text_only.saliency.size == 0 and text_only.vis_pos.size == 0 and text_only.resp_pos.size > 0
    assert manifest["saliency"]["layers"] and manifest["saliency"]["irs"] is not None


def test_response_topk_equals_full_log_softmax(store, tiny_teacher_dir, dataset):
    model, _, encoded = teacher_and_samples(tiny_teacher_dir, dataset)
    reader = StoreReader(store)
    for sid in ("s00", "s03", "s05"):
        sig = unpack(reader.get(sid))
        with torch.no_grad():
            logp = torch.log_softmax(model(**encoded[sid].model_inputs).logits[0].float(), -1)
        np.testing.assert_array_equal(sig.resp_pos, encoded[sid].response_positions)
        ref = logp[sig.resp_pos]
        # stored ids are the true top-k, their log-probs the full-vocabulary values, tail mass exact
        np.testing.assert_allclose(sig.resp_logprobs, torch.gather(ref, 1, torch.as_tensor(sig.resp_ids)).numpy(), atol=1e-5)
        np.testing.assert_allclose(sig.resp_logprobs, ref.topk(16).values.numpy(), atol=1e-5)
        tail = 1 - np.exp(sig.resp_logprobs).sum(1)
        np.testing.assert_allclose(tail, 1 - ref.exp().topk(16).values.sum(1).numpy(), atol=1e-5)
        if sig.vis_pos.size:
            np.testing.assert_allclose(sig.vis_logprobs, torch.gather(logp[sig.vis_pos], 1, torch.as_tensor(sig.vis_ids)).numpy(), atol=1e-5)
        # sampled target: counts sum to draws at every position, ids are real tokens
        assert (sig.sample_counts.sum(1) == 20).all() and sig.sample_ids.max() < logp.shape[1]


def test_saliency_equals_eager_attention(store, tiny_teacher_dir, dataset):
    """Stored maps (fp16) against output_attentions=True on an eager copy of the teacher. Tolerance 2e-3 (fp16)."""
    model, _, encoded = teacher_and_samples(tiny_teacher_dir, dataset)
    model.set_attn_implementation("eager")
    layers = json.loads((store / "manifest.json").read_text())["saliency"]["layers"]
    reader = StoreReader(store)
    for sid in ("s00", "s03", "s04"):
        enc, sig = encoded[sid], unpack(reader.get(sid))
        with torch.no_grad():
            att = model(**enc.model_inputs, output_attentions=True).attentions
        vis = torch.as_tensor(enc.visual_positions)
        a = torch.stack([att[layer][0].mean(0) for layer in layers]).mean(0)  # [T, T], head- and layer-mean
        for j, turn in enumerate(enc.turns):
            ref = a[torch.as_tensor(turn.instruction)][:, vis].mean(0)
            ref = ref / ref.sum()
            np.testing.assert_allclose(sig.saliency[j], ref.numpy(), atol=2e-3, err_msg=f"{sid} turn {j}")
        assert sig.saliency.shape == (len(enc.turns), len(vis))


def test_transitions_equal_plain_forward(store, tiny_teacher_dir, dataset):
    """Each stored branch distribution equals a forward of x<=t followed by the candidate. Tolerance 1e-4."""
    assert_transitions_equal_plain_forward(store, tiny_teacher_dir, dataset, ("s01", "s03", "s05"))


def assert_transitions_equal_plain_forward(store: Path, teacher_dir: Path, dataset: Path, sample_ids) -> None:
    """Every third stored branch row of ``sample_ids`` (after every image) against a plain forward of
    x<=t followed by its candidate; the candidate's stored log-prob against the plain forward at t."""
    model, _, encoded = teacher_and_samples(teacher_dir, dataset)
    reader = StoreReader(store)
    checked = 0
    for sid in sample_ids:
        enc, sig = encoded[sid], unpack(reader.get(sid))
        assert len(sig.tpa_pos) > 0
        assert set(sig.tpa_pos) <= set(sig.resp_pos)
        assert not np.any(sig.tpa_cand == enc.input_ids[sig.tpa_pos + 1])  # never the gold token
        last_visual = int(enc.visual_positions.max()) if enc.visual_positions.size else -1
        rows = [r for r in range(len(sig.tpa_pos)) if sig.tpa_pos[r] > last_visual]  # every image stays in x<=t
        for r in rows[::3]:
            t, c = int(sig.tpa_pos[r]), int(sig.tpa_cand[r])
            inputs = dict(enc.model_inputs)
            ids = torch.cat([inputs["input_ids"][:, : t + 1], torch.tensor([[c]])], 1)
            inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, : t + 2].clone()
                inputs["mm_token_type_ids"][:, -1] = 0
            with torch.no_grad():
                logp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            np.testing.assert_allclose(sig.tpa_logprobs[r], logp[torch.as_tensor(sig.tpa_ids[r])].numpy(), atol=1e-4)
            with torch.no_grad():
                at_t = torch.log_softmax(model(**enc.model_inputs).logits[0, t].float(), -1)
            np.testing.assert_allclose(sig.tpa_cand_logprob[r], float(at_t[c]), atol=1e-4)
            checked += 1
    assert checked >= 3


@pytest.mark.slow
def test_two_ray_workers_equal_in_process(store, tmp_path, tiny_teacher_dir, dataset):
    out = tmp_path / "ray"
    run(dump_config(tiny_teacher_dir, dataset, out, workers=2))
    assert verify(out) == []
    assert_same_store(store, out)


def test_batch_size_does_not_change_the_store(store, tmp_path, tiny_teacher_dir, dataset):
    out = tmp_path / "b1"
    run(dump_config(tiny_teacher_dir, dataset, out, batch_size=1))
    assert_same_store(store, out, atol=1e-5)


# `pipeline run ...` whose reading of one image (argv[1]) waits on a FIFO (argv[2]) that no one
# writes: the data layer itself skips a FIFO given as an image rather than wait on it.
_WAIT_ON_IMAGE = """
import sys
from pipeline.data.records import Record
from pipeline.tools.cli import main

target, gate = sys.argv[1:3]
load = Record.load

def load_or_wait(self):
    if any(str(p) == target for p in self.images):
        open(gate).close()
    return load(self)

Record.load = load_or_wait
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_crash_then_resume_equals_uninterrupted(store, tmp_path, tiny_teacher_dir):
    """SIGKILL a real dump while it waits on one sample's image (on a FIFO), then resume."""
    data_root = tmp_path / "d"
    data = make_dataset(data_root, n=10, bad=True)
    target = data_root / "img" / "9.png"  # sample 9 lives in the third shard (shard_size 4)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    out = tmp_path / "killed"
    cfg = dump_config(tiny_teacher_dir, data, out)
    cfg_path = tmp_path / "dump.yaml"
    from pipeline.config import save_config

    save_config(cfg, cfg_path)
    proc = subprocess.Popen([sys.executable, "-c", _WAIT_ON_IMAGE, str(target), str(gate), "run", "teacher-dump", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "shards" / "shard-00002.partial").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "dump never reached the blocking sample"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    assert (out / "shards" / "shard-00000").is_dir() and (out / "shards" / "shard-00002.partial").is_dir()
    # the teacher store fixture used an identical dataset (same bytes), so the stores must agree
    run(cfg)
    assert verify(out) == []
    assert not list((out / "shards").glob("*.partial"))
    assert_same_store(store, out)


@pytest.mark.slow  # 10-35 s (machine load): two real `pipeline run teacher-dump` processes, then a dump in-process
def test_a_second_dump_on_one_directory_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two real dump processes on one store: the second is refused (exit 2, no traceback), naming
    the directory and the running one, and writes nothing; once the first is SIGKILLed, a run takes
    its lock over and completes a store that verifies."""
    from pipeline.config import save_config
    from pipeline.locks import LOCK_NAME
    from pipeline.tools.tiny import save_tiny_vlm

    teacher = save_tiny_vlm(tmp_path / "teacher", "llava", "teacher")
    data_root = tmp_path / "d"
    data = make_dataset(data_root, n=6)
    target = data_root / "img" / "4.png"  # reading this image blocks the first run (on a FIFO gate)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    out = tmp_path / "store"
    cfg = dump_config(teacher, data, out)
    cfg_path = tmp_path / "dump.yaml"
    save_config(cfg, cfg_path)
    proc = subprocess.Popen([sys.executable, "-c", _WAIT_ON_IMAGE, str(target), str(gate), "run", "teacher-dump", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "dump.json").exists():  # written holding the lock, before any image is read
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the first dump never claimed the store"
            time.sleep(0.1)
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        # A process of its own (not in-process): unrefused, it would block on the FIFO too.
        second = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "run", "teacher-dump", "--config", str(cfg_path)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{out} is in use by another run: teacher-dump (pid {proc.pid} on host" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
        assert proc.poll() is None  # the first run goes on
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists() and (out / LOCK_NAME).exists()
    assert main(["run", "teacher-dump", "--config", str(cfg_path)]) == 0
    assert f"taking over the lock left by teacher-dump (pid {proc.pid}" in capsys.readouterr().err  # logged
    assert verify(out) == [] and not (out / LOCK_NAME).exists()
    assert len(StoreReader(out)) == 6


def test_rerun_of_complete_store_does_nothing_and_mismatch_is_refused(store, tiny_teacher_dir, dataset, capsys):
    before = (store / "manifest.json").read_text()
    run(dump_config(tiny_teacher_dir, dataset, store))
    assert (store / "manifest.json").read_text() == before
    with pytest.raises(StoreMismatchError, match="signals.top_k: store has 16, this run has 8"):
        run(dump_config(tiny_teacher_dir, dataset, store, **{"signals.top_k": 8}))


def test_a_store_with_draws_of_another_method_is_not_resumed(store, tmp_path, tiny_teacher_dir, dataset):
    """A store whose settings lack the sampled draws' method (written before it was recorded, with
    draws by another method) is refused, naming the entry, rather than resumed with mixed draws."""
    copy = tmp_path / "older"
    shutil.copytree(store, copy)
    settings = json.loads((copy / "dump.json").read_text())
    assert settings["sampled_draws"] == "inverse-cdf-v1"
    del settings["sampled_draws"]
    (copy / "dump.json").write_text(json.dumps(settings))
    with pytest.raises(StoreMismatchError, match="sampled_draws"):
        run(dump_config(tiny_teacher_dir, dataset, copy))


def test_a_store_from_before_sampled_rows_resumes_and_other_rows_are_refused(store, tmp_path, tiny_teacher_dir, dataset):
    """A store whose settings predate signals.sampled.rows (response draws only, no key) resumes
    with the default rows; a run asking for visual or branch draws on it is refused, naming the
    rows, rather than mixing shards with and without them."""
    copy = tmp_path / "older"
    shutil.copytree(store, copy)
    settings = json.loads((copy / "dump.json").read_text())
    assert settings["signals"]["sampled"].pop("rows") == ["response"] and "sampled_streams" not in settings
    (copy / "dump.json").write_text(json.dumps(settings))
    before = (copy / "manifest.json").read_text()
    run(dump_config(tiny_teacher_dir, dataset, copy))
    assert (copy / "manifest.json").read_text() == before
    with pytest.raises(StoreMismatchError, match="signals.sampled.rows"):
        run(dump_config(tiny_teacher_dir, dataset, copy, **{"signals.sampled.rows": ["response", "visual"]}))


def test_corrupted_shard_fails_verify_naming_it(store, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    corrupt_chunk(copy, "shard-00001", "resp_logprobs")
    problems = verify(copy)
    assert problems and any("shard-00001" in p for p in problems)
    assert main(["verify", str(copy)]) == 1
    assert "shard-00001" in capsys.readouterr().out


def test_named_layers_out_of_range_stop_the_dump(tmp_path, tiny_teacher_dir, dataset):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="out of range"):
        run(dump_config(tiny_teacher_dir, dataset, tmp_path / "x", **{"signals.saliency_layers": [7]}))


def test_inspect_sample_json_via_cli(store, family, capsys):
    assert main(["inspect", str(store), "--sample", "s03", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sample_id"] == "s03" and len(out["visual_blocks"]) == 2 * BLOCKS_PER_IMAGE[family]
    assert [b["image_index"] for b in out["visual_blocks"]] == [0] * BLOCKS_PER_IMAGE[family] + [1] * BLOCKS_PER_IMAGE[family]
    assert out["transitions"] and all(len(c["ids"]) == 16 for t in out["transitions"] for c in t["candidates"])

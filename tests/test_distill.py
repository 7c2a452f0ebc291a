"""Stage 2 end to end: one store trains students of different sizes (one with a pooled grid),
losses fall, exports load and generate, a crashed run resumes to the same losses, refusals."""

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
from conftest import corrupt_chunk
from test_dump import dump_config, make_dataset
from transformers import AutoModelForImageTextToText

from pipeline.config import load_config
from pipeline.data import Record
from pipeline.errors import PipelineError
from pipeline.processors import load_processor
from pipeline.tools.tiny import save_tiny_parts, save_tiny_vlm
from schemas import StoreFormatError
from stage1_teacher.dump import run as dump
from stage2_student import distill as distill_module
from schemas.compat import IncompatibleStudentError
from stage2_student.config import DistillConfig
from stage2_student.distill import run


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("s2")
    data = make_dataset(root / "data", n=8)
    out = root / "store"
    dump(dump_config(tiny_teacher_dir, data, out, **{"signals.transitions.max_positions": 4}))
    return out


def _llava_store(tmp_path_factory, name: str, n: int, **overrides) -> Path:
    """A store of a tiny llava teacher on ``n`` records (transitions at 4 positions, plus ``overrides``)."""
    root = tmp_path_factory.mktemp(name)
    teacher = save_tiny_vlm(root / "teacher", "llava", "teacher")
    data = make_dataset(root / "data", n=n)
    out = root / "store"
    dump(dump_config(teacher, data, out, **{"signals.transitions.max_positions": 4, **overrides}))
    return out


@pytest.fixture(scope="module")
def llava_store(tmp_path_factory) -> Path:
    """A store of the llava family alone, for checks that need one family only."""
    return _llava_store(tmp_path_factory, "s2-llava", 8)


def distill_config(store: Path, out: Path, student: dict, **over) -> DistillConfig:
    values = {
        "store.dir": str(store),
        "output.dir": str(out),
        "train.steps": 8,
        "train.batch_size": 4,
        "train.lr": 0.003,
        "train.schedule": "constant",
        "loss.kd": 1.0,
        "loss.iva": 1.0,
        "loss.tpa": 1.0,
        "data.num_workers": 0,
        "data.max_length": 400,
        **{f"student.{k}": v for k, v in student.items()},
        **over,
    }
    return load_config(DistillConfig, None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()])


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["student", "student-pooled"])
def test_one_store_trains_students_of_two_sizes(store, tmp_path, family, preset):
    student_dir = save_tiny_vlm(tmp_path / "init", family, preset, seed=1)
    out = tmp_path / "run"
    result = run(distill_config(store, out, {"path": str(student_dir)}))
    log = losses(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(r["tpa"] > 0 and r["iva"] > 0 and r["kd"] > 0 for r in log)  # every term active and fed
    first, last = np.mean([r["total"] for r in log[:2]]), np.mean([r["total"] for r in log[-2:]])
    assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    # the export is a plain HF checkpoint that loads and generates
    final = Path(result["final"])
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = load_processor(final)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    from PIL import Image

    image = Image.open(next((store.parent / "data" / "img").glob("*.png")))
    inputs = processor(text=text, images=[image], return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    provenance = json.loads((final / "provenance.json").read_text())
    assert provenance["store"]["tokenizer_fingerprint"] == json.loads((store / "manifest.json").read_text())["tokenizer"]["fingerprint"]
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())


def test_composed_student_from_lm_and_vision_encoder(llava_store, tmp_path):
    store = llava_store
    lm, vision = save_tiny_parts(tmp_path / "parts", "student")
    out = tmp_path / "run"
    run(distill_config(store, out, {"language_model": str(lm), "vision_model": str(vision)}, **{"train.steps": 3}))
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert len(losses(out)) == 3


@pytest.mark.slow
def test_crash_and_resume_reproduces_the_losses(store, tmp_path, monkeypatch, family):
    student_dir = save_tiny_vlm(tmp_path / "init", family, "student", seed=1)
    over = {"train.steps": 6, "train.checkpoint_every": 2, "train.schedule": "cosine", "train.warmup_steps": 1}
    straight = tmp_path / "straight"
    run(distill_config(store, straight, {"path": str(student_dir)}, **over))

    crashed = tmp_path / "crashed"
    real = distill_module.compute_losses
    calls = {"n": 0}

    def crash_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "compute_losses", crash_on_fifth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(distill_config(store, crashed, {"path": str(student_dir)}, **over))
    assert (crashed / "checkpoints" / "latest").read_text() == "step-000004"
    monkeypatch.setattr(distill_module, "compute_losses", real)
    run(distill_config(store, crashed, {"path": str(student_dir)}, **over))

    a, b = losses(straight), losses(crashed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("total", "sft", "kd", "iva", "tpa", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)


# Runs `pipeline run distill` in a child process whose loss function blocks (after announcing it)
# on the given call, so that the parent's SIGKILL lands at a known step.
_BLOCKING_CHILD = """
import sys, time
from pathlib import Path
from stage2_student import distill
from pipeline.tools.cli import main
block_at, ready = int(sys.argv[2]), Path(sys.argv[3])
real, calls = distill.compute_losses, [0]
def compute_losses(*args, **kwargs):
    calls[0] += 1
    if calls[0] == block_at:
        ready.write_text("blocked")
        time.sleep(600)
    return real(*args, **kwargs)
distill.compute_losses = compute_losses
sys.exit(main(["run", "distill", "--config", sys.argv[1]]))
"""


def sigkill_during_step(cfg_path: Path, step: int, ready: Path) -> subprocess.Popen:
    """Run ``pipeline run distill --config cfg_path`` in a process of its own session, wait until it
    blocks inside step ``step`` (it writes ``ready``), SIGKILL its session, and return the process."""
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_CHILD, str(cfg_path), str(step), str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, f"the run never reached step {step}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc


def test_sigkilled_run_resumes_to_the_same_losses(llava_store, tmp_path):
    """A real SIGKILL of a `pipeline run distill` process during step 5 (after the step-4
    checkpoint), then `pipeline run distill` again: every logged loss equals the uninterrupted run's."""
    from pipeline.config import save_config

    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student", seed=1)
    over = {"train.steps": 6, "train.checkpoint_every": 2, "train.schedule": "cosine", "train.warmup_steps": 1}
    straight = tmp_path / "straight"
    run(distill_config(llava_store, straight, {"path": str(student_dir)}, **over))

    killed = tmp_path / "killed"
    cfg_path = tmp_path / "distill.yaml"
    save_config(distill_config(llava_store, killed, {"path": str(student_dir)}, **over), cfg_path)
    proc = sigkill_during_step(cfg_path, 5, tmp_path / "blocked")
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "latest").read_text() == "step-000004"
    assert not (killed / "final").exists()
    assert [r["step"] for r in losses(killed)] == [1, 2, 3, 4]

    resumed = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "run", "distill", "--config", str(cfg_path)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("total", "sft", "kd", "iva", "tpa", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert (killed / "final" / "provenance.json").exists()


def tensorboard_steps(run_dir: Path, tag: str = "loss/total") -> list[int]:
    """The steps TensorBoard shows for ``tag`` (it applies the purge events of restarted runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow  # 15-45 s (machine load): two real `pipeline run distill` processes (imports, a tiny model each)
def test_sigkilled_before_the_first_checkpoint_restarts_with_a_clean_log(llava_store, tmp_path):
    """A real SIGKILL during step 3 of a run without checkpoints (checkpoint_every 0), then the same
    command again: it starts over from step 0, and its log has each step once, equal to an
    uninterrupted run's (JSONL and TensorBoard)."""
    from pipeline.config import save_config

    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student", seed=1)
    over = {"train.steps": 4, "train.checkpoint_every": 0}
    straight = tmp_path / "straight"
    run(distill_config(llava_store, straight, {"path": str(student_dir)}, **over))

    killed = tmp_path / "killed"
    cfg_path = tmp_path / "distill.yaml"
    save_config(distill_config(llava_store, killed, {"path": str(student_dir)}, **over), cfg_path)
    sigkill_during_step(cfg_path, 3, tmp_path / "blocked")
    assert not (killed / "checkpoints" / "latest").exists()
    assert [r["step"] for r in losses(killed)] == [1, 2]

    again = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "run", "distill", "--config", str(cfg_path)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("total", "sft", "kd", "iva", "tpa", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert tensorboard_steps(killed) == [1, 2, 3, 4]


@pytest.mark.slow  # 7-35 s (machine load): a real `pipeline run distill` process, then a run in-process
def test_a_second_run_on_one_directory_is_refused_while_the_first_runs(llava_store, tmp_path, capsys):
    """Two runs on one output directory: the second is refused (exit 2, no traceback), naming the
    directory and the running one, and touches nothing there; once the first is SIGKILLed, a run
    takes its lock over and trains."""
    from pipeline.config import save_config
    from pipeline.locks import LOCK_NAME
    from pipeline.tools.cli import main

    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    out = tmp_path / "run"
    cfg = distill_config(llava_store, out, {"path": str(student_dir)}, **{"train.steps": 2})
    cfg_path = tmp_path / "distill.yaml"
    save_config(cfg, cfg_path)
    ready = tmp_path / "blocked"
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_CHILD, str(cfg_path), "2", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the first run never reached step 2"
            time.sleep(0.1)
        before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert main(["run", "distill", "--config", str(cfg_path)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another run: distill (pid {proc.pid} on host" in err, err
        assert "Traceback" not in err
        assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert proc.poll() is None  # the first run goes on
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / LOCK_NAME).exists()
    run(cfg)
    assert f"taking over the lock left by distill (pid {proc.pid}" in capsys.readouterr().err  # logged
    assert [r["step"] for r in losses(out)] == [1, 2] and (out / "final").is_dir()
    assert not (out / LOCK_NAME).exists()


def test_a_rank_outside_rank_0s_process_group_is_refused(llava_store, tmp_path, monkeypatch):
    """Only rank 0 takes the output lock, for the ranks of its process group; a process launched as
    rank 1 that accelerate runs alone (no group formed) would train unlocked beside rank 0."""
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    out = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(PipelineError, match="launched as rank 1 .* formed no process group"):
        run(distill_config(llava_store, out, {"path": str(student_dir)}, **{"train.steps": 1}))
    assert not (out / "config.yaml").exists() and not (out / "losses.jsonl").exists()


def test_resume_with_other_settings_is_refused(llava_store, tmp_path):
    store = llava_store
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    out = tmp_path / "run"
    run(distill_config(store, out, {"path": str(student_dir)}, **{"train.steps": 2}))
    with pytest.raises(PipelineError, match="holds a run with other settings"):
        run(distill_config(store, out, {"path": str(student_dir)}, **{"train.steps": 2, "loss.kd": 0.5}))


def test_pixel_cache_dir_feeds_the_run_and_is_not_a_run_setting(llava_store, tmp_path, monkeypatch):
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    pixels = tmp_path / "pixels"
    over = {"train.steps": 3, "data.image_cache_mb": 0, "data.pixel_cache_dir": str(pixels)}  # 3 steps: 1.5 epochs
    run(distill_config(llava_store, tmp_path / "filling", {"path": str(student_dir)}, **over))
    assert list(pixels.glob("*/*.pixels"))

    def refuse(self):
        raise AssertionError(f"sample {self.sample_id!r}: an image file was read")

    monkeypatch.setattr(Record, "load", refuse)
    run(distill_config(llava_store, tmp_path / "reading", {"path": str(student_dir)}, **over))
    assert losses(tmp_path / "reading") == losses(tmp_path / "filling")
    monkeypatch.undo()
    # Resuming without the pixel cache (or with another one) is the same run.
    run(distill_config(llava_store, tmp_path / "reading", {"path": str(student_dir)}, **{"train.steps": 4}))
    assert [r["step"] for r in losses(tmp_path / "reading")] == [1, 2, 3, 4]


def test_refuses_another_tokenizer(store, tmp_path, family):
    from pipeline.tools.tiny import build_tiny_vlm

    model, processor = build_tiny_vlm(family, "student", vocab_size=600)
    d = tmp_path / "other"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    with pytest.raises(IncompatibleStudentError, match="tokenizer"):
        run(distill_config(store, tmp_path / "run", {"path": str(d)}))


def test_refuses_another_temperature(llava_store, tmp_path):
    store = llava_store
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    with pytest.raises(IncompatibleStudentError, match="τ=2.0"):
        run(distill_config(store, tmp_path / "run", {"path": str(student_dir)}, **{"loss.temperature": 2.0}))


def test_refuses_a_corrupted_shard(llava_store, tmp_path):
    store = llava_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    corrupt_chunk(copy, "shard-00000", "resp_ids")
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    with pytest.raises(StoreFormatError, match="shard-00000"):
        run(distill_config(copy, tmp_path / "run", {"path": str(student_dir)}, **{"store.verify_checksums": True}))


def test_a_deleted_chunk_file_fails_the_run_instead_of_training_on_zeros(llava_store, tmp_path, capsys):
    """zarr reads a missing chunk file as zeros; without checksums the run must still stop, naming
    shard and array, before any step (not train a student on zero log-probs)."""
    from pipeline.config import save_config
    from pipeline.tools.cli import main

    copy = tmp_path / "store"
    shutil.copytree(llava_store, copy)
    chunk = next(p for p in sorted((copy / "shards/shard-00000/arrays.zarr/resp_logprobs/c").rglob("*")) if p.is_file())
    chunk.unlink()
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    out = tmp_path / "run"
    cfg_path = tmp_path / "distill.yaml"
    save_config(distill_config(copy, out, {"path": str(student_dir)}, **{"train.steps": 3}), cfg_path)
    assert main(["run", "distill", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "shard 'shard-00000'" in err and "arrays.zarr/resp_logprobs" in err and "is missing" in err, err
    assert "Traceback" not in err
    assert not (out / "losses.jsonl").exists() and not (out / "final").exists()


def test_sampled_target_and_attention_variant(llava_store, tmp_path):
    store = llava_store
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    out = tmp_path / "run"
    run(distill_config(store, out, {"path": str(student_dir)}, **{
        "train.steps": 2, "loss.target": "sampled", "loss.iva_attention": 1.0, "loss.tpa": 0.0,
    }))
    log = losses(out)
    assert all(np.isfinite(r["total"]) and r["iva_attention"] > 0 and r["kd"] > 0 for r in log)


def test_sft_only_recipe_has_only_the_sft_term(llava_store, tmp_path):
    store = llava_store
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    out = tmp_path / "run"
    run(distill_config(store, out, {"path": str(student_dir)}, **{"train.steps": 2, "loss.kd": 0.0, "loss.iva": 0.0, "loss.tpa": 0.0}))
    assert set(losses(out)[0]) == {"step", "lr", "sft", "total"}
    torch.testing.assert_close(torch.tensor(losses(out)[0]["sft"]), torch.tensor(losses(out)[0]["total"]))


def test_frozen_vision_tower_keeps_its_weights_while_the_rest_trains(llava_store, tmp_path):
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    before = AutoModelForImageTextToText.from_pretrained(student_dir).state_dict()
    out = tmp_path / "run"
    run(distill_config(llava_store, out, {"path": str(student_dir)}, **{"train.steps": 3, "train.freeze": ["model.vision_tower"]}))
    after = AutoModelForImageTextToText.from_pretrained(out / "final").state_dict()
    vision = [k for k in before if k.startswith("model.vision_tower.")]
    others = [k for k in before if not k.startswith("model.vision_tower.")]
    assert vision and others
    assert all(torch.equal(before[k], after[k]) for k in vision)
    changed = [k for k in others if not torch.equal(before[k], after[k])]
    assert any(".projector" in k or "multi_modal_projector" in k for k in changed)
    assert any("language_model" in k for k in changed)


def test_a_freeze_prefix_that_names_nothing_is_refused(llava_store, tmp_path):
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    with pytest.raises(PipelineError, match=r"train.freeze: no parameter under 'model.vision_towr'.*model.vision_tower"):
        run(distill_config(llava_store, tmp_path / "run", {"path": str(student_dir)}, **{"train.freeze": ["model.vision_towr"]}))


@pytest.fixture(scope="module")
def sampled_rows_store(tmp_path_factory) -> Path:
    """A llava store with sampled targets for response, visual and branch rows."""
    return _llava_store(tmp_path_factory, "s2-sampled-rows", 6,
                        **{"signals.sampled.rows": ["response", "visual", "transitions"]})


def test_sampled_iva_and_tpa_targets_train(sampled_rows_store, tmp_path):
    """A store with visual and branch draws verifies, and trains a student (one with a pooled grid:
    its cells' counts are the overlap-weighted mean of the teacher cells') with iva_target and
    tpa_target sampled: every term finite and present."""
    from schemas.signal_checks import verify

    assert verify(sampled_rows_store) == []
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student-pooled")
    out = tmp_path / "run"
    run(distill_config(sampled_rows_store, out, {"path": str(student_dir)}, **{
        "train.steps": 2, "loss.iva_target": "sampled", "loss.tpa_target": "sampled", "loss.target": "sampled",
    }))
    log = losses(out)
    assert all(np.isfinite(r["total"]) and r["iva"] > 0 and r["tpa"] > 0 and r["kd"] > 0 for r in log), log


@pytest.mark.parametrize("key, kind", [("loss.iva_target", "visual"), ("loss.tpa_target", "transitions")])
def test_sampled_iva_or_tpa_on_a_store_without_those_draws_is_refused(llava_store, tmp_path, key, kind):
    student_dir = save_tiny_vlm(tmp_path / "init", "llava", "student")
    with pytest.raises(PipelineError, match=rf"{key}=sampled but the store {llava_store} has no sampled targets for its {kind} rows"):
        run(distill_config(llava_store, tmp_path / "run", {"path": str(student_dir)}, **{key: "sampled"}))
    assert not (tmp_path / "run" / "losses.jsonl").exists()


def test_pooled_cells_take_the_overlap_weighted_mean_of_the_draws():
    """_sampled_union: the weighted mean of the rows' counts over the union of their ids; rows of
    equal draws give counts that still sum to the draws."""
    from stage2_student.data.remap import _sampled_union

    ids = np.array([[3, 7, -1], [1, 3, 9]])
    counts = np.array([[4, 6, 0], [2, 5, 3]])
    got_ids, got_counts = _sampled_union(ids, counts, np.array([0.25, 0.75]))
    np.testing.assert_array_equal(got_ids, [1, 3, 7, 9])
    np.testing.assert_allclose(got_counts, [0.75 * 2, 0.25 * 4 + 0.75 * 5, 0.25 * 6, 0.75 * 3])
    assert got_counts.sum() == pytest.approx(10)

"""Stage 2 on more than one process (DESIGN §6): `torchrun --nproc_per_node 2` on CPU with gloo.

Two processes at batch B are one process at batch 2B: the same logged losses and the same final
weights. Each rank reads its own samples, only rank 0 writes, and a SIGKILL of one rank followed
by the same command resumes to the uninterrupted run's losses.

The store has 7 samples; the 2-process run takes batch 1 per process with 2 micro-batches per
step (4 samples a step), the 1-process reference batch 2 with 2 micro-batches. Step 2 ends epoch
0 with 3 samples, so rank 1 gets a filler there, and step 3 starts epoch 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distill import distill_config, losses
from test_dump import dump_config, make_dataset

from pipeline.config import save_config
from pipeline.errors import PipelineError
from pipeline.processors import load_processor
from pipeline.tools.tiny import save_tiny_vlm
from stage1_teacher.dump import run as dump
from stage2_student import losses as L
from stage2_student.data import StoreDataset
from stage2_student.distill import run, run_fingerprint

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 7
TRAIN = {"train.steps": 3, "train.grad_accum": 2, "train.checkpoint_every": 1,
         "train.schedule": "cosine", "train.warmup_steps": 1}
LOGGED = ("total", "sft", "kd", "iva", "tpa", "lr")

# Runs `pipeline run distill` under torchrun, recording per rank every batch it trains on and every
# call that writes to the run directory; argv[3] = "rank:call" blocks that rank's loss call (after
# writing its pid to <record>/blocked) so that the test can SIGKILL it there; "-1:0" never blocks.
_CHILD = """
import json, os, sys, time
from pathlib import Path
from stage2_student import distill
from pipeline.tools.cli import main

rank, record = int(os.environ["RANK"]), Path(sys.argv[2])
block_rank, block_at = (int(x) for x in sys.argv[3].split(":"))

def note(**rec):
    with (record / f"rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\\n")

real, calls = distill.compute_losses, [0]
def compute_losses(model, batch, *args, **kwargs):
    calls[0] += 1
    if rank == block_rank and calls[0] == block_at:
        (record / "blocked").write_text(str(os.getpid()))
        time.sleep(600)
    note(kind="batch", samples=batch.sample_ids, filler=batch.filler, position=list(batch.position))
    return real(model, batch, *args, **kwargs)
distill.compute_losses = compute_losses

def recorded(name, fn):
    def wrapper(*args, **kwargs):
        note(kind="write", what=name)
        return fn(*args, **kwargs)
    return wrapper
for name in ("save_checkpoint", "save_student", "save_config", "_truncate_log", "LossLog"):
    setattr(distill, name, recorded(name, getattr(distill, name)))
sys.exit(main(["run", "distill", "--config", sys.argv[1]]))
"""


def torchrun(tmp: Path, cfg_path: Path, record: Path, block: str = "-1:0") -> subprocess.Popen:
    """Two processes on CPU (one torch thread each); stderr goes to <record>/torchrun.log."""
    record.mkdir(parents=True, exist_ok=True)
    script = tmp / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    with (record / "torchrun.log").open("a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(script), str(cfg_path), str(record), block],
            env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )


def finish(proc: subprocess.Popen, record: Path, timeout: float = 240) -> int:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"torchrun timed out:\n{(record / 'torchrun.log').read_text()[-3000:]}")
    return proc.returncode


def records(record: Path, rank: int) -> list[dict]:
    path = record / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def ddp_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    teacher = save_tiny_vlm(root / "teacher", "qwen2_vl", "teacher")
    data = make_dataset(root / "data", n=N_SAMPLES)  # one text-only sample, one with two images
    out = root / "store"
    dump(dump_config(teacher, data, out, **{"signals.transitions.max_positions": 4}))
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("ddp-student"), "qwen2_vl", "student", seed=1)


@pytest.fixture(scope="module")
def one_process(ddp_store, student_dir, tmp_path_factory) -> Path:
    """The reference: one process at batch 2 (x 2 micro-batches), in this process."""
    out = tmp_path_factory.mktemp("one") / "run"
    run(distill_config(ddp_store, out, {"path": str(student_dir)}, **{**TRAIN, "train.batch_size": 2}))
    return out


def two_process_config(ddp_store, student_dir, out: Path, path: Path, **over) -> Path:
    save_config(distill_config(ddp_store, out, {"path": str(student_dir)}, **{**TRAIN, "train.batch_size": 1, **over}), path)
    return path


@pytest.fixture(scope="module")
def two_processes(ddp_store, student_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two processes at batch 1 (x 2 micro-batches), uninterrupted: (run dir, record dir)."""
    tmp = tmp_path_factory.mktemp("two")
    out, record = tmp / "run", tmp / "record"
    cfg = two_process_config(ddp_store, student_dir, out, tmp / "distill.yaml")
    rc = finish(torchrun(tmp, cfg, record), record)
    assert rc == 0, (record / "torchrun.log").read_text()[-3000:]
    return out, record


def assert_same_losses(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3]
    for ra, rb in zip(la, lb):
        for key in LOGGED:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-9), (ra["step"], key)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        # atol: a parameter whose exact gradient is 0 (an attention key bias) gets Adam steps of
        # rounding noise in both runs; 1e-5 is 1/300 of one step (lr 3e-3) of any other parameter.
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# In this process: the data split and the loss normalisation that make 2 x B equal 1 x 2B
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length_group", [0, 2])
def test_ranks_in_step_split_each_global_batch(ddp_store, student_dir, length_group):
    """With pad_ranks, step s of 2 ranks at batch 1 reads exactly the samples of batch s of one
    process at batch 2 (with length grouping in runs of the same samples), every rank yields the
    same number of batches, and the rank without a batch at an epoch's end gets a flagged filler."""
    processor = load_processor(student_dir)

    def batches(bs: int, lg: int, rank: int = 0, world: int = 1) -> list:
        ds = StoreDataset(ddp_store, processor, batch_size=bs, seed=3, length_group=lg, rank=rank,
                          world_size=world, pad_ranks=True, temperature=1.0)
        return list(ds)

    one = batches(2, length_group)
    ranks = [batches(1, length_group * 2, r, 2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 4
    for s, batch in enumerate(one):
        real = [b for b in (ranks[0][s], ranks[1][s]) if not b.filler]
        assert [i for b in real for i in b.sample_ids] == batch.sample_ids
    assert [b.filler for b in ranks[0]] == [False] * 4
    assert [b.filler for b in ranks[1]] == [False, False, False, True]
    assert ranks[1][3].position == (0, 7) and ranks[1][3].sample_ids == ranks[0][3].sample_ids


def _split(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 11, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(11, generator=g)[:4] for _ in range(n)])
    ids[1, :] = -1  # a padding row
    ids[2, 2:] = -1
    logprobs = torch.log_softmax(torch.randn(n, 11, generator=g, dtype=torch.float64), -1).gather(1, ids.clamp_min(0))
    return logits, ids, logprobs, g


def test_term_counts_make_a_split_batch_exact():
    """Each term's mean over a batch equals the count-weighted mean of its means over two parts:
    what `distill.global_loss` relies on to make a DDP step the step of one process."""
    n, cut = 10, 6
    logits, ids, logprobs, g = _split(n)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights[4] = 0.0
    group = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4, 5, 5])  # no group straddles the cut, as no sample straddles ranks
    cand = torch.log(torch.rand(n, generator=g, dtype=torch.float64))
    cand[7] = float("-inf")
    labels = torch.randint(0, 11, (n,), generator=g)
    labels[[0, 3, 8]] = -100
    counts = torch.randint(0, 3, ids.shape, generator=g)
    attn = torch.rand(n, 5, generator=g, dtype=torch.float64)
    sal = torch.rand(n, 5, generator=g, dtype=torch.float64)
    sal[3] = 0.0
    mask = torch.rand(n, 5, generator=g) > 0.2
    terms = {
        "sft": (lambda s: L.sft_loss(logits[s], labels[s]), lambda s: L.sft_count(labels[s])),
        "kd": (lambda s: L.kd_loss(logits[s], ids[s], logprobs[s]), lambda s: L.kd_count(ids[s])),
        "sampled": (lambda s: L.sampled_kd_loss(logits[s], ids[s], counts[s]), lambda s: L.sampled_kd_count(ids[s], counts[s])),
        "iva": (lambda s: L.iva_loss(logits[s], ids[s], logprobs[s], weights[s], group=group[s]),
                lambda s: L.iva_count(ids[s], weights[s], group[s])),
        "tpa": (lambda s: L.tpa_loss(logits[s], ids[s], logprobs[s], cand[s], group[s]),
                lambda s: L.tpa_count(ids[s], cand[s], group[s])),
        "attention": (lambda s: L.attention_kl(attn[s], sal[s], mask[s]), lambda s: L.attention_count(attn[s], sal[s], mask[s])),
    }
    whole, a, b, empty = slice(0, n), slice(0, cut), slice(cut, n), slice(0, 0)
    for name, (loss, count) in terms.items():
        na, nb = count(a), count(b)
        assert count(whole) == na + nb and count(empty) == 0, name
        split = (na * loss(a) + nb * loss(b)) / (na + nb)
        torch.testing.assert_close(split, loss(whole), msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# torchrun --nproc_per_node 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_at_batch_b_equal_one_at_batch_2b(one_process, two_processes):
    """Same logged losses (every term, global over both ranks, and the lr: the schedule steps once
    per optimizer step) and same final weights as one process with twice the batch."""
    out, _ = two_processes
    assert_same_losses(one_process, out)
    assert_same_weights(one_process / "final", out / "final")
    assert json.loads((out / "final" / "provenance.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_ranks_read_disjoint_samples_covering_the_epoch(two_processes, ddp_store):
    _, record = two_processes
    ranks = [[r for r in records(record, k) if r["kind"] == "batch"] for k in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6  # 3 steps x 2 micro-batches, in step
    epoch0 = [[r for r in rk if r["position"][0] == 0] for rk in ranks]
    real = [[s for r in rk if not r["filler"] for s in r["samples"]] for rk in epoch0]
    assert not set(real[0]) & set(real[1])
    assert sorted(real[0] + real[1]) == [f"s{i:02d}" for i in range(N_SAMPLES)]
    assert [r["filler"] for r in epoch0[1]] == [False, False, False, True]  # 7 batches of 1 on 2 ranks


@pytest.mark.slow
def test_only_rank_zero_writes(two_processes):
    out, record = two_processes
    writes = [[r["what"] for r in records(record, k) if r["kind"] == "write"] for k in (0, 1)]
    assert writes[1] == []
    assert sorted(writes[0]) == ["LossLog", "_truncate_log", "save_checkpoint", "save_checkpoint", "save_checkpoint",
                                 "save_config", "save_student"]
    assert [r["step"] for r in losses(out)] == [1, 2, 3]
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002", "step-000003"]
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_sigkill_of_one_rank_resumes_to_the_same_losses(ddp_store, student_dir, two_processes, tmp_path):
    """Rank 1 is SIGKILLed at its first loss call of step 3 (after the step-2 checkpoint, at the
    end of epoch 0); torchrun tears the run down; the same command again finishes the run with
    the uninterrupted run's losses and weights."""
    out, record = tmp_path / "run", tmp_path / "record"
    cfg = two_process_config(ddp_store, student_dir, out, tmp_path / "distill.yaml")
    proc = torchrun(tmp_path, cfg, record, block="1:5")
    blocked = record / "blocked"
    deadline = time.time() + 180
    try:
        # rank 0 writes the step-2 checkpoint after rank 1 has moved on: wait for both
        latest = out / "checkpoints" / "latest"
        while not (blocked.exists() and latest.is_file() and latest.read_text() == "step-000002"):
            assert proc.poll() is None, (record / "torchrun.log").read_text()[-3000:]
            assert time.time() < deadline, "rank 1 never reached step 3"
            time.sleep(0.1)
        time.sleep(0.2)  # the pid is written before the sleep starts
        os.kill(int(blocked.read_text()), signal.SIGKILL)
        assert finish(proc, record, timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    assert not (out / "final").exists()
    assert [r["step"] for r in losses(out)] == [1, 2]

    blocked.unlink()
    rc = finish(torchrun(tmp_path, cfg, record), record)
    assert rc == 0, (record / "torchrun.log").read_text()[-3000:]
    uninterrupted, _ = two_processes
    assert_same_losses(uninterrupted, out)
    assert_same_weights(uninterrupted / "final", out / "final")


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(ddp_store, student_dir, two_processes, tmp_path):
    """The global batch and the data position depend on the process count: a 2-process run does not
    resume on one process."""
    out = tmp_path / "run"
    shutil.copytree(two_processes[0], out)
    cfg = distill_config(ddp_store, out, {"path": str(student_dir)}, **{**TRAIN, "train.batch_size": 1, "train.steps": 4})
    state_path = out / "checkpoints" / "step-000003" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "run_fingerprint": run_fingerprint(cfg)}))  # the copy's output.dir
    with pytest.raises(PipelineError, match="world_size 2"):
        run(cfg)

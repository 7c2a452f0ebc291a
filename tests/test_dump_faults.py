"""Stage 1 under faults and bad input: every one ends in a clear error naming the file, shard or key
(or is handled), and nothing already done is lost. One tiny llava teacher (the faults do not depend
on the family)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_image, write_json
from test_dump import assert_same_store, dump_config, make_dataset

from pipeline.config import ConfigError, save_config
from pipeline.errors import PipelineError
from pipeline.tools.cli import main
from pipeline.tools.inspect_store import verify
from pipeline.tools.tiny import save_tiny_vlm
from schemas import StoreFormatError, StoreReader
from stage1_teacher.dump import StoreMismatchError, run


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("teacher"), "llava", "teacher")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n=8)  # two shards of 4


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher_dir, data) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    run(dump_config(teacher_dir, data, out))
    return out


def overrides(**values) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def cli_dump(teacher: Path, data: Path, out: Path, **over) -> list[str]:
    return ["run", "teacher-dump", *overrides(**{"teacher.path": str(teacher), "data.path": str(data),
                                                  "output.dir": str(out), "data.max_length": 400, **over})]


def shard_stamps(store: Path) -> dict[str, int]:
    """Each complete shard's directory inode and its shard.json mtime: unchanged means not redone."""
    return {p.name: (p.stat().st_ino, (p / "shard.json").stat().st_mtime_ns)
            for p in (store / "shards").iterdir() if not p.name.endswith(".partial")}


# ---------------------------------------------------------------- settings refused up front


@pytest.mark.parametrize("key", ["signals.top_k", "signals.transitions.top_k", "signals.transitions.candidates"])
def test_top_k_beyond_the_vocabulary_is_refused_before_anything_is_written(tmp_path, teacher_dir, data, key):
    out = tmp_path / "s"
    with pytest.raises(ConfigError) as info:
        run(dump_config(teacher_dir, data, out, **{key: 100_000}))
    assert info.value.key == key and "vocabulary" in info.value.message and "512 tokens" in info.value.message
    assert not out.exists()


def test_cli_refuses_a_too_large_top_k_and_an_infinite_temperature(tmp_path, teacher_dir, data, capsys):
    out = tmp_path / "s"
    assert main(cli_dump(teacher_dir, data, out, **{"signals.top_k": 100_000})) == 2
    err = capsys.readouterr().err
    assert "signals.top_k" in err and "512 tokens" in err and "Traceback" not in err
    assert main(cli_dump(teacher_dir, data, out, **{"signals.temperature": ".inf"})) == 2
    err = capsys.readouterr().err
    assert "signals.temperature" in err and "finite" in err
    assert not out.exists()


def test_corrupt_teacher_config_json_is_named_by_the_cli(tmp_path, teacher_dir, data, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    (teacher / "config.json").write_text('{"model_type": "llava", ')
    out = tmp_path / "s"
    assert main(cli_dump(teacher, data, out)) == 2
    err = capsys.readouterr().err
    assert str(teacher / "config.json") in err and "Traceback" not in err
    assert not out.exists()


def test_corrupt_student_config_json_is_named_by_the_cli(tmp_path, store, capsys):
    student = save_tiny_vlm(tmp_path / "student", "llava", "student", seed=1)
    (student / "config.json").write_text("{not json")
    argv = ["run", "distill", f"store.dir={store}", f"output.dir={tmp_path / 'run'}", f"student.path={student}",
            "train.steps=1", "data.num_workers=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(student / "config.json") in err and "Traceback" not in err


# ---------------------------------------------------------------- a first run that failed early


def test_a_run_that_failed_before_its_first_shard_does_not_lock_the_store(tmp_path, teacher_dir, data):
    """Settings are claimed before the records are read; with no shard begun, a corrected re-run
    replaces them instead of being refused until the directory is deleted."""
    out = tmp_path / "s"
    with pytest.raises(PipelineError, match="data path not found"):
        run(dump_config(teacher_dir, tmp_path / "missing.json", out))
    assert (out / "dump.json").is_file()
    run(dump_config(teacher_dir, data, out))
    assert verify(out) == [] and StoreReader(out).manifest.n_samples == 8
    # once shards exist, other settings are refused as before
    (out / "manifest.json").unlink()
    with pytest.raises(StoreMismatchError, match="signals.top_k: store has 16, this run has 8"):
        run(dump_config(teacher_dir, data, out, **{"signals.top_k": 8}))


def test_calibration_without_an_irs_pair_is_named_and_named_layers_then_run(tmp_path, teacher_dir):
    write_image(tmp_path / "a.png")
    one_turn = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": f"x{i}", "image": "a.png", "conversations": one_turn} for i in range(3)]
    data = write_json(tmp_path / "d.json", records)
    out = tmp_path / "s"
    with pytest.raises(PipelineError, match="no IRS pair.*signals.saliency_layers"):
        run(dump_config(teacher_dir, data, out, **{"signals.calibration_samples": 1}))
    run(dump_config(teacher_dir, data, out, **{"signals.calibration_samples": 1, "signals.saliency_layers": [0]}))
    assert verify(out) == [] and StoreReader(out).manifest.saliency_layers == [0]


# ---------------------------------------------------------------- store side files and the manifest


def test_verify_checks_dump_json_and_calibration_json_against_the_manifest(tmp_path, store):
    assert verify(store) == []
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    settings = json.loads((copy / "dump.json").read_text())
    settings["signals"]["temperature"] = 2.0
    (copy / "dump.json").write_text(json.dumps(settings))
    problems = verify(copy)
    assert any("dump.json" in p and "signals.temperature" in p for p in problems), problems

    shutil.copy(store / "dump.json", copy / "dump.json")
    calibration = json.loads((copy / "calibration.json").read_text())
    other = [1 - calibration["layers"][0]]
    (copy / "calibration.json").write_text(json.dumps({**calibration, "layers": other}))
    problems = verify(copy)
    assert any("calibration.json" in p for p in problems), problems


def test_an_edited_manifest_setting_is_refused_by_verify_and_distill(tmp_path, store, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["signals"]["temperature"] = 2.0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 1
    assert "manifest.json" in capsys.readouterr().out
    student = save_tiny_vlm(tmp_path / "student", "llava", "student", seed=1)
    argv = ["run", "distill", f"store.dir={copy}", f"output.dir={tmp_path / 'run'}", f"student.path={student}",
            "train.steps=1", "data.num_workers=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(copy / "manifest.json") in err and "settings_sha256" in err


@pytest.mark.parametrize("change", ["edited", "deleted"])
def test_resume_refuses_a_changed_calibration(tmp_path, store, teacher_dir, data, change):
    """Complete shards were computed with the calibrated layers: a resume must not compute the rest
    with others (an edited calibration.json, or a new calibration after it was deleted)."""
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    (copy / "manifest.json").unlink()  # an interrupted dump: complete shards, no manifest
    path = copy / "calibration.json"
    if change == "edited":
        calibration = json.loads(path.read_text())
        path.write_text(json.dumps({**calibration, "layers": [1 - calibration["layers"][0]]}))
    else:
        path.unlink()
    with pytest.raises((StoreFormatError, StoreMismatchError), match=str(path)):
        run(dump_config(teacher_dir, data, copy))
    assert not (copy / "manifest.json").exists()


# ---------------------------------------------------------------- the disk


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_writing_a_shard_names_it_and_keeps_the_others(tmp_path, teacher_dir, data, monkeypatch):
    import schemas.writer

    out = tmp_path / "s"
    real = schemas.writer.atomic_write_text

    def full_for_shard_1(path, text):
        if "shard-00001" in str(path):
            raise enospc(path)
        return real(path, text)

    monkeypatch.setattr(schemas.writer, "atomic_write_text", full_for_shard_1)
    cfg = dump_config(teacher_dir, data, out)
    with pytest.raises(PipelineError, match="shard-00001.*No space left on device"):
        run(cfg)
    assert (out / "shards" / "shard-00001.partial").is_dir() and not (out / "manifest.json").exists()
    kept = shard_stamps(out)
    assert list(kept) == ["shard-00000"]
    monkeypatch.undo()
    run(cfg)
    assert verify(out) == [] and shard_stamps(out)["shard-00000"] == kept["shard-00000"]


def test_a_full_disk_while_writing_the_manifest_names_it_and_keeps_the_shards(tmp_path, teacher_dir, data,
                                                                              monkeypatch, capsys):
    import schemas.manifest

    out = tmp_path / "s"
    real = schemas.manifest.atomic_write_text

    def full_for_manifest(path, text):
        if Path(path).name == "manifest.json":
            raise enospc(path)
        return real(path, text)

    monkeypatch.setattr(schemas.manifest, "atomic_write_text", full_for_manifest)
    assert main(cli_dump(teacher_dir, data, out, **{"output.shard_size": 4})) == 2
    err = capsys.readouterr().err
    assert "manifest" in err and "No space left on device" in err and "Traceback" not in err
    kept = shard_stamps(out)
    assert sorted(kept) == ["shard-00000", "shard-00001"]
    monkeypatch.undo()
    assert main(cli_dump(teacher_dir, data, out, **{"output.shard_size": 4})) == 0
    assert verify(out) == [] and shard_stamps(out) == kept


def test_an_output_dir_that_cannot_be_written_is_refused_up_front(tmp_path, teacher_dir, data, capsys, monkeypatch):
    """We run as root, so chmod cannot make a directory read-only: a path under a regular file
    stands for a new store that cannot be created, a failing probe write for an existing one."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "store"
    assert main(cli_dump(teacher_dir, data, out)) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err

    existing = tmp_path / "s"
    with pytest.raises(PipelineError, match="data path not found"):  # dump.json claimed, then stopped
        run(dump_config(teacher_dir, tmp_path / "missing.json", existing))

    def read_only(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(PipelineError, match=f"output.dir {existing}.*Read-only file system"):
        run(dump_config(teacher_dir, tmp_path / "missing.json", existing))


# ---------------------------------------------------------------- Ray


def test_ray_errors_name_the_shard():
    """Spent retries, and an error raised by a shard's own code, name the shard (no Ray needed:
    each refusal comes before any call to it)."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from stage1_teacher.executors import RayExecutor, _raise_named

    executor = RayExecutor.__new__(RayExecutor)
    executor.cfg = dump_config(Path("t"), Path("d"), Path("o"), workers=2, shard_retries=1)
    with pytest.raises(PipelineError, match=r"shard shard-00003: its Ray actor died on each of 2 attempt\(s\) "
                                            r"\(shard_retries=1\).*re-run"):
        executor._replace(object(), "shard shard-00003", 2, ActorDiedError())
    user_error = RayTaskError("run_shard", "Traceback ...", PipelineError("disk full")).as_instanceof_cause()
    with pytest.raises(PipelineError, match="^shard shard-00002: disk full$"):
        _raise_named("shard shard-00002", user_error)
    bug = RayTaskError("run_shard", "Traceback ...", KeyError("x")).as_instanceof_cause()
    with pytest.raises(KeyError) as info:
        _raise_named("shard shard-00002", bug)
    assert "while running shard shard-00002 on a Ray actor" in info.value.__notes__


@pytest.mark.slow  # Ray start-up, and one more actor (teacher load) for the retry: ~30-80 s on 2 cores
def test_a_shard_whose_actor_dies_is_redone_on_a_fresh_actor(tmp_path, teacher_dir, data):
    """The actor running shard-00001 kills its own process on the first attempt; the dump retries
    the shard on a fresh actor and the store equals the in-process one."""
    import ray

    marker = tmp_path / "died-once"

    def kill_first_attempt(target: str, marker: str):
        def hook():  # runs in every Ray worker process before its first task
            import os

            from stage1_teacher import executors

            original = executors.DumpWorker.run_shard

            def run_shard(self, name, *args, **kwargs):
                if name == target and not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)
                return original(self, name, *args, **kwargs)

            executors.DumpWorker.run_shard = run_shard

        return hook

    out = tmp_path / "ray"
    ray.init(include_dashboard=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": kill_first_attempt("shard-00001", str(marker))})
    try:
        run(dump_config(teacher_dir, data, out, workers=2, **{"signals.saliency_layers": [0]}))
    finally:
        ray.shutdown()
    assert marker.exists()  # the actor did die
    assert verify(out) == []
    reference = tmp_path / "in-process"
    run(dump_config(teacher_dir, data, reference, **{"signals.saliency_layers": [0]}))
    assert_same_store(reference, out)


@pytest.mark.slow  # a real `pipeline run teacher-dump` with Ray in a subprocess: ~30-70 s on 2 cores
def test_sigterm_shuts_ray_down(tmp_path, teacher_dir):
    """SIGTERM while the actors are busy (60 samples in 15 shards; the signal comes once the second
    shard has begun): the driver unwinds like Ctrl-C, kills its actors and shuts Ray down; nothing
    of its session is left running. (Images are read only from regular files, so a FIFO image can
    no longer hold an actor; the store's size keeps the dump running instead.)"""
    root = tmp_path / "d"
    data = make_dataset(root, n=60)
    out = tmp_path / "s"
    cfg_path = tmp_path / "dump.yaml"
    save_config(dump_config(teacher_dir, data, out, workers=2, **{"signals.saliency_layers": [0]}), cfg_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tools.cli", "run", "teacher-dump", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "shards" / "shard-00001.partial").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the dump never reached the blocking sample"
            time.sleep(0.2)
        time.sleep(0.5)
        assert not (out / "manifest.json").exists()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 130 and "interrupted" in err, (rc, err[-2000:])

    def left() -> list[str]:  # live processes of the dump's session (zombies are already dead)
        ps = subprocess.run(["ps", "-eo", "sid=,stat=,pid=,args="], capture_output=True, text=True).stdout
        rows = [line.split(None, 3) for line in ps.splitlines()]
        return [" ".join(r) for r in rows if len(r) >= 3 and r[0] == str(proc.pid) and not r[1].startswith("Z")]

    deadline = time.time() + 30
    while left() and time.time() < deadline:
        time.sleep(0.5)
    assert left() == []


def test_the_leftovers_of_an_interrupted_claim_do_not_block_the_store(tmp_path, teacher_dir, data):
    """A run killed while it wrote dump.json leaves the atomic write's temporary (and perhaps its
    lock file and write probe): the directory is still its own, not "not a teacher store"."""
    out = tmp_path / "s"
    out.mkdir()
    (out / ".dump.json.4242.deadbeef.tmp").write_text("{")
    (out / ".write-probe-4242").write_bytes(b"")
    (out / ".pipeline.lock").write_text('{"job": "teacher-dump", "pid": 4242, "host": "gone"}\n')
    manifest = run(dump_config(teacher_dir, data, out, **{"signals.saliency_layers": [0]}))
    assert manifest.n_samples > 0 and verify(out) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="is not empty and is not a teacher store"):
        run(dump_config(teacher_dir, data, tmp_path / "other"))

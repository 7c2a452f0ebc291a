"""The command line: the job table resolves, help lists keys, errors are clear, shipped YAMLs load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tools.cli import RUN_JOBS, main, resolve
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_parser_and_command_table_agree():
    import argparse

    from pipeline.tools.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)


def test_every_job_resolves_to_a_config_class_and_a_function():
    for name, job in RUN_JOBS.items():
        cls, fn = resolve(job.config), resolve(job.function)
        assert callable(fn) and hasattr(cls, "__dataclass_fields__"), name


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    job = path.stem.split(".")[0]  # configs/<job>[.variant].yaml
    assert job in RUN_JOBS, f"{path.name}: no job named {job!r}"
    cfg = load_config(resolve(RUN_JOBS[job].config), path)
    assert cfg is not None


def test_run_help_lists_documented_keys(capsys):
    assert main(["run", "data-check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "data.max_length: int = 2048" in out and "over_length" in out


def test_config_errors_exit_2_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata:\n  path: d.json\n")
    assert main(["run", "data-check", "--config", str(cfg), "data.max_lenght=3"]) == 2
    err = capsys.readouterr().err
    assert "data.max_lenght" in err and "did you mean 'data.max_length'" in err
    assert main(["run", "data-check", "--config", str(cfg), "data.max_length=abc"]) == 2
    assert "data.max_length" in capsys.readouterr().err
    assert main(["run", "data-check", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_bad_data_path_is_a_clear_error(tmp_path, capsys, tiny_teacher_dir):
    assert main(["run", "data-check", f"model={tiny_teacher_dir}", f"data.path={tmp_path}/nothing.json"]) == 2
    assert "data path not found" in capsys.readouterr().err


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit):
        main(["tiny", "--family", "llava", "--out", "x", "stray=1"])


def test_data_check_end_to_end(tmp_path, tiny_teacher_dir):
    from conftest import write_image, write_json

    write_image(tmp_path / "a.png")
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]
    data = write_json(tmp_path / "d.json", [{"id": "a", "image": "a.png", "conversations": conv}, {"id": "b", "image": "gone.png", "conversations": conv}])
    report = tmp_path / "r.json"
    assert main(["run", "data-check", f"model={tiny_teacher_dir}", f"data.path={data}", f"report={report}"]) == 0
    r = json.loads(report.read_text())
    assert r["samples_ok"] == 1 and r["skipped_by_reason"] == {"missing_image": 1}
    assert r["skipped"][0]["sample_id"] == "b"


def test_tiny_command_writes_a_checkpoint(tmp_path):
    assert main(["tiny", "--family", "qwen2_vl", "--preset", "student", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "config.json").is_file() and (tmp_path / "s" / "tokenizer.json").is_file()


def test_tiny_command_offers_every_tiny_family():
    from pipeline.tools.cli import build_parser
    from pipeline.tools.tiny import FAMILIES

    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command")
    family = next(a for a in sub.choices["tiny"]._actions if a.dest == "family")
    assert list(family.choices) == list(FAMILIES)

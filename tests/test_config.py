"""pipeline.config: strict loading, overrides, errors that name the key, round trip, help text."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from pipeline.config import (
    ConfigError, check, describe, field_docs, from_dict, load_config, parse_overrides,
    save_config, to_dict,
)


@dataclass
class TransitionsConfig:
    top_k: int = 8
    """Candidates kept per transition position."""
    epsilon: float = 0.05
    """Threshold on the probability gap."""

    def __post_init__(self):
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")


@dataclass
class SignalsConfig:
    top_k: int = 64
    """How many teacher token ids (with exact log-probs) to keep per response position."""
    saliency_layers: Literal["auto"] | list[int] = "auto"
    """`auto` picks the layer by IRS calibration; or a list of layer indices."""
    mode: Literal["dense", "sparse"] = "sparse"
    """Storage mode."""
    transitions: TransitionsConfig = field(default_factory=TransitionsConfig)
    """Transition-position settings."""

    def __post_init__(self):
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")


@dataclass
class DumpConfig:
    out_dir: Path
    """Where the shards go.

    Created if missing."""
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    """What the teacher records."""
    seed: int = 0
    """Seed for sampling."""
    temperature: float = 1.0
    """Dump temperature."""
    resume: bool = False
    """Continue an interrupted dump."""
    limit: Optional[int] = None
    """At most this many samples."""
    tags: dict[str, str] = field(default_factory=dict)
    """Free-form labels."""
    shape: tuple[int, ...] = (336, 336)
    """Image size."""
    extra: SignalsConfig | None = None
    """Optional second signal set."""


def write(tmp_path, text, name="dump.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def err(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_nested_loading_from_yaml(tmp_path):
    path = write(tmp_path, "out_dir: shards\nsignals:\n  top_k: 32\n  transitions:\n    top_k: 4\n"
                           "temperature: 2\ntags: {a: b}\n")
    cfg = load_config(DumpConfig, path)
    assert cfg.out_dir == Path("shards")
    assert cfg.signals.top_k == 32 and cfg.signals.transitions.top_k == 4
    assert cfg.signals.transitions.epsilon == 0.05 and cfg.signals.saliency_layers == "auto"
    assert cfg.temperature == 2.0 and isinstance(cfg.temperature, float)
    assert cfg.tags == {"a": "b"} and cfg.limit is None and cfg.shape == (336, 336)


def test_overrides_nested_keys_and_lists(tmp_path):
    path = write(tmp_path, "out_dir: shards\nsignals:\n  top_k: 32\n  mode: dense\n")
    cfg = load_config(DumpConfig, path, ["signals.transitions.top_k=2", "signals.saliency_layers=[3, 5]",
                                         "limit=null", "resume=true", "shape=[224,224]"])
    assert cfg.signals.transitions.top_k == 2
    assert cfg.signals.saliency_layers == [3, 5]
    assert cfg.signals.top_k == 32 and cfg.signals.mode == "dense"  # siblings kept
    assert cfg.resume is True and cfg.shape == (224, 224)


def test_parse_overrides():
    assert parse_overrides(["a.b=3", "a.c=[1,2]", "x=auto", "p=null", "q=[1,2"]) == {
        "a": {"b": 3, "c": [1, 2]}, "x": "auto", "p": None, "q": "[1,2"}


@pytest.mark.parametrize("item", ["top_k", "=3", "a..b=3", "a.=1"])
def test_malformed_override(item):
    assert repr(item) in err(parse_overrides, [item])
    with pytest.raises(ConfigError):
        load_config(DumpConfig, None, ["out_dir=x", item])


def test_unknown_key_with_suggestion(tmp_path):
    path = write(tmp_path, "out_dir: x\nsignals:\n  top_kk: 3\n")
    msg = err(load_config, DumpConfig, path)
    assert "signals.top_kk: unknown key; did you mean 'signals.top_k'?" in msg
    assert "saliency_layers" in msg  # valid keys at that level are listed
    assert str(path) in msg


def test_unknown_top_level_key():
    msg = err(from_dict, DumpConfig, {"out_dir": "x", "sed": 1})
    assert msg.startswith("sed: unknown key; did you mean 'seed'?")
    assert "did you mean" not in err(from_dict, DumpConfig, {"out_dir": "x", "zzzz": 1})


def test_unknown_key_from_override_names_the_override():
    msg = err(load_config, DumpConfig, None, ["out_dir=x", "signals.transitions.topk=3"])
    assert "override 'signals.transitions.topk=3'" in msg
    assert "did you mean 'signals.transitions.top_k'?" in msg


@pytest.mark.parametrize("value, shown", [("many", "'many' (str)"), (1.5, "1.5 (float)"),
                                          (3.0, "3.0 (float)"), (True, "True (bool)")])
def test_wrong_type_for_int(value, shown):
    msg = err(from_dict, DumpConfig, {"out_dir": "x", "signals": {"top_k": value}})
    assert msg == f"signals.top_k: expected int, got {shown}"


def test_other_wrong_types():
    assert err(from_dict, DumpConfig, {"out_dir": "x", "resume": 1}) == "resume: expected bool, got 1 (int)"
    assert "temperature: expected float" in err(from_dict, DumpConfig, {"out_dir": "x", "temperature": True})
    assert "out_dir: expected path" in err(from_dict, DumpConfig, {"out_dir": 3})
    assert "tags.a: expected str" in err(from_dict, DumpConfig, {"out_dir": "x", "tags": {"a": 1}})
    assert "signals: expected a mapping for SignalsConfig, got 3 (int)" in err(
        from_dict, DumpConfig, {"out_dir": "x", "signals": 3})


def test_list_element_of_wrong_type():
    msg = err(from_dict, SignalsConfig, {"saliency_layers": [1, "two"]})
    assert msg == "saliency_layers[1]: expected int, got 'two' (str)"


def test_literal_violation():
    msg = err(from_dict, SignalsConfig, {"mode": "medium"})
    assert msg == "mode: expected 'dense' | 'sparse', got 'medium' (str)"


def test_union_literal_or_list():
    assert from_dict(SignalsConfig, {"saliency_layers": "auto"}).saliency_layers == "auto"
    assert from_dict(SignalsConfig, {"saliency_layers": [2, 7]}).saliency_layers == [2, 7]
    msg = err(from_dict, SignalsConfig, {"saliency_layers": "sometimes"})
    assert msg == "saliency_layers: expected 'auto' | list[int], got 'sometimes' (str)"


def test_optional_nested_dataclass_keeps_inner_error():
    assert from_dict(DumpConfig, {"out_dir": "x", "extra": None}).extra is None
    assert from_dict(DumpConfig, {"out_dir": "x", "extra": {"top_k": 2}}).extra.top_k == 2
    assert "extra.top_kk: unknown key; did you mean 'extra.top_k'?" in err(
        from_dict, DumpConfig, {"out_dir": "x", "extra": {"top_kk": 2}})
    assert err(from_dict, DumpConfig, {"out_dir": "x", "limit": "all"}) == \
        "limit: expected int | null, got 'all' (str)"


def test_post_init_error_gets_full_dotted_path(tmp_path):
    path = write(tmp_path, "out_dir: x\nsignals:\n  transitions:\n    top_k: 0\n")
    msg = err(load_config, DumpConfig, path)
    assert msg == f"{path}: signals.transitions.top_k: must be >= 1, got 0"
    with pytest.raises(ConfigError) as info:
        load_config(DumpConfig, None, ["out_dir=x", "signals.top_k=0"])
    assert info.value.key == "signals.top_k" and info.value.source == "override 'signals.top_k=0'"
    assert str(ConfigError("top_k", "must be >= 1, got 0")) == "top_k: must be >= 1, got 0"


def test_missing_required_field():
    msg = err(from_dict, DumpConfig, {"seed": 1})
    assert msg.startswith("out_dir: required key is missing")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = err(load_config, DumpConfig, path)
    assert str(path) in msg and "not found" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "out_dir: x\nsignals:\n  top_k: [1, 2\nseed: 3\n")
    msg = err(load_config, DumpConfig, path)
    assert str(path) in msg and "invalid YAML at line 4" in msg


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str")])
def test_top_level_must_be_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    msg = err(load_config, DumpConfig, path)
    assert msg == f"{path}: the top level must be a mapping of keys, got {kind}"


def test_round_trip_save_load(tmp_path):
    cfg = DumpConfig(out_dir=Path("a/b"), seed=3, temperature=0.5, limit=10, tags={"k": "123"},
                     signals=SignalsConfig(top_k=16, saliency_layers=[1, 2], mode="dense",
                                           transitions=TransitionsConfig(top_k=3)),
                     extra=SignalsConfig(top_k=5))
    plain = to_dict(cfg)
    assert plain["out_dir"] == "a/b" and plain["shape"] == [336, 336]
    assert plain["signals"]["transitions"] == {"top_k": 3, "epsilon": 0.05}
    assert from_dict(DumpConfig, plain) == cfg
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    text = path.read_text()
    assert text.index("out_dir") < text.index("signals") < text.index("seed")  # field order
    assert load_config(DumpConfig, path) == cfg
    assert not (tmp_path / "saved.yaml.tmp").exists()


def test_field_docs_and_describe():
    docs = field_docs(DumpConfig)
    assert docs["out_dir"] == "Where the shards go.\n\nCreated if missing."
    assert docs["seed"] == "Seed for sampling."
    text = describe(DumpConfig)
    assert "out_dir: path (required)" in text
    assert "signals.top_k: int = 64\n    How many teacher token ids" in text
    assert "signals.saliency_layers: 'auto' | list[int] = 'auto'" in text
    assert "signals.transitions.epsilon: float = 0.05\n    Threshold on the probability gap." in text
    assert "extra: SignalsConfig | null = null" in text
    assert "    Created if missing." in text and "resume: bool = false" in text
    assert "limit: int | null = null" in text


def _float_keys(cls, prefix: str = ""):
    """Dotted keys of every float field of a config class, nested sections included."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        subs = [m for m in members if dataclasses.is_dataclass(m)]
        if subs:
            yield from _float_keys(subs[0], key + ".")
        elif float in members:
            yield key


@pytest.mark.parametrize("job", ["teacher-dump", "distill", "eval", "data-check"])
def test_non_finite_floats_are_refused_for_every_key_of_every_job(job):
    """.nan, .inf and -.inf pass checks written as `x > 0` (inf) and break files that refuse them
    (a dump ran to the end, then its manifest could not be written): the loader refuses them."""
    from pipeline.tools.cli import RUN_JOBS, resolve

    repo = Path(__file__).resolve().parents[1]
    base = sorted((repo / "configs").glob(f"{job}*.yaml"))[0]
    cls = resolve(RUN_JOBS[job].config)
    keys = list(_float_keys(cls))
    assert keys or job in ("eval", "data-check")
    for key in keys:
        for text in (".nan", ".inf", "-.inf"):
            with pytest.raises(ConfigError) as info:
                load_config(cls, base, [f"{key}={text}"])
            assert info.value.key == key and "finite" in info.value.message, (key, text, str(info.value))
    assert "finite" in err(from_dict, DumpConfig, {"out_dir": "x", "temperature": 10**400})


# ---------------------------------------------------------------- sampled rows (signals.sampled.rows)


def _dump(**over):
    from stage1_teacher.config import DumpConfig

    values = {"teacher.path": "t", "data.path": "d.json", "output.dir": "o", **over}
    return load_config(DumpConfig, None, [f"{k}={v}" for k, v in values.items()])


def test_sampled_rows_default_is_the_response_rows():
    cfg = _dump(**{"signals.sampled.enabled": "true"})
    assert cfg.signals.sampled.rows == ["response"] and cfg.signals.sampled.kinds() == ["response"]
    assert _dump().signals.sampled.kinds() == []  # not enabled: no row kind draws
    both = _dump(**{"signals.sampled.enabled": "true", "signals.sampled.rows": "[transitions, visual]"})
    assert both.signals.sampled.kinds() == ["visual", "transitions"]


@pytest.mark.parametrize("rows, key, phrase", [
    ("[response, branches]", "signals.sampled.rows", "unknown row kind(s) ['branches']; valid: response, visual, transitions"),
    ("[visual, visual]", "signals.sampled.rows", "names a row kind twice"),
    ("[]", "signals.sampled.rows", "at least one row kind"),
])
def test_sampled_rows_errors_name_the_key(rows, key, phrase):
    with pytest.raises(ConfigError) as e:
        _dump(**{"signals.sampled.enabled": "true", "signals.sampled.rows": rows})
    assert e.value.key == key and phrase in e.value.message, str(e.value)


def test_sampled_transition_rows_need_transitions():
    with pytest.raises(ConfigError) as e:
        _dump(**{"signals.sampled.enabled": "true", "signals.sampled.rows": "[transitions]",
                 "signals.transitions.enabled": "false"})
    assert e.value.key == "signals.sampled.rows" and "transitions are disabled" in e.value.message


def test_loss_iva_and_tpa_targets_are_topk_or_sampled():
    from stage2_student.config import DistillConfig

    base = ["student.path=s", "store.dir=st", "output.dir=o"]
    cfg = load_config(DistillConfig, None, base + ["loss.iva_target=sampled"])
    assert (cfg.loss.target, cfg.loss.iva_target, cfg.loss.tpa_target) == ("topk", "sampled", "topk")
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, base + ["loss.tpa_target=exact"])
    assert e.value.key == "loss.tpa_target"

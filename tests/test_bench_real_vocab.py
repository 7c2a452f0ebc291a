"""bench/real_vocab.py: its tokenizer builder, its FLOP model (against torch's own FLOP counter and
hand-computed row counts), and one end-to-end run of the script at a small vocabulary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import real_vocab as rv  # noqa: E402

from pipeline.tools.tiny import EOS_TURN, LLAVA_IMAGE, PAD, build_tokenizer  # noqa: E402
from stage2_student.config import LossConfig  # noqa: E402


def test_tokenizer_has_qwen2_size_and_encodes_as_the_tiny_one():
    tok, base = rv.real_vocab_tokenizer(), build_tokenizer(512)
    assert len(tok) == rv.QWEN2_TOKENS == 151_665
    text = "What colour is the shape at the top left? <|im_start|>user\nThe red circle.<|im_end|>"
    assert tok(text).input_ids == base(text).input_ids
    for special in (PAD, EOS_TURN, LLAVA_IMAGE):
        assert tok.convert_tokens_to_ids(special) == base.convert_tokens_to_ids(special)
    assert tok.convert_ids_to_tokens(151_664) == "##151664"
    assert tok.convert_tokens_to_ids("##000512") == 512
    assert (tok.pad_token, tok.eos_token, tok.padding_side) == (PAD, EOS_TURN, "right")
    with pytest.raises(ValueError, match="below the base"):
        rv.real_vocab_tokenizer(100)


def test_step_flops_by_hand():
    shape = rv.TextShape(hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16)
    # q, k, v: 8 x (2 + 2) x 4 = 128; o: 2 x 4 x 8 = 64; gate, up, down: 3 x 8 x 16 = 384
    assert rv.linear_weights_per_layer(shape) == 576
    # 3 x [2 layers x (2 x 576 x 10 + 4 x 2 x 4 x 30) + 2 x 8 x 100 x 3] = 3 x (24960 + 4800)
    assert rv.step_flops(shape, 100, rv.StepWork(body_tokens=10, attention_pairs=30, head_rows=3)) == 89_280


def test_step_flops_match_torch_flop_counter():
    """A forward + backward of a Qwen2 decoder with logits at every position, eager attention (which
    computes all L x L pairs): torch's FLOP counter must count exactly the model's formula."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = rv.TextShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48)
    vocab, length = 50, 7
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=vocab,
        attn_implementation="eager",
    ))
    ids = torch.randint(0, vocab, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    work = rv.StepWork(body_tokens=length, attention_pairs=length * length, head_rows=length)
    assert counter.get_total_flops() == rv.step_flops(shape, vocab, work)


def _batch():
    """Two samples of 5 and 4 tokens in T = 6: sample 0 labelled at t = 3, 4 (read at rows 2, 3),
    sample 1 at t = 3 (row 2); IVA rows (0, 1), (1, 0); branch rows at 4 (sample 0) and 3, 3 (sample 1)."""
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = 7
    labels[1, 3] = 7
    return SimpleNamespace(
        model_inputs={"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])},
        labels=labels,
        kd=SimpleNamespace(batch=torch.tensor([0, 0, 1]), pos=torch.tensor([2, 3, 2])),
        iva=SimpleNamespace(batch=torch.tensor([0, 1]), pos=torch.tensor([1, 0])),
        tpa=SimpleNamespace(branch_pos=torch.tensor([[4, -1], [3, 3]])),
    )


def test_step_work_counts_the_rows_each_recipe_reads():
    batch = _batch()
    # SFT: 9 tokens, causal pairs 5*6/2 + 4*5/2 = 25, the 3 labelled rows.
    assert rv.step_work(batch, LossConfig(sft=1.0)) == rv.StepWork(9, 25, 3)
    # KD without IVA/TPA reads the same rows as SFT (the union counts them once).
    assert rv.step_work(batch, LossConfig(sft=1.0, kd=1.0)) == rv.StepWork(9, 25, 3)
    # Align-TI: + 3 branch tokens attending 5 + 4 + 4 keys; head: 3 response + 2 IVA rows + 3 branch rows.
    assert rv.step_work(batch, LossConfig(sft=1.0, kd=1.0, iva=1.0, tpa=1.0)) == rv.StepWork(12, 38, 8)


def test_head_scale_sets_the_logit_std():
    shape = rv.TextShape(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=32)
    tok = rv.real_vocab_tokenizer(2000)
    model, _ = rv.build_vlm(shape, rv.VisionShape(image_size=28), tok, 2048, logit_scale=rv.head_scale(shape, 8.0))
    assert model.get_output_embeddings().weight.shape[0] == 2048
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=torch.randint(0, 500, (1, 64))).last_hidden_state
        logits = model.get_output_embeddings()(hidden)
    assert 7.0 < float(logits.std()) < 9.0


def test_end_to_end_small(tmp_path):
    """The whole script at a 1,000-token vocabulary (--quick shapes, 2 samples, no memory
    subprocesses): results written, Stage 1 selected branch rows at the design's transition
    defaults, Stage 2 at both batch sizes with its row counts; then one memory measurement as the
    subprocess runs it (here in this process) on the run's student and store."""
    out, work = tmp_path / "rv.json", tmp_path / "work"
    path = rv.main(["--quick", "--tokens", "1000", "--rows", "1024", "--samples", "2", "--reps", "1",
                    "--skip-memory", "--workdir", str(work), "--out", str(out)])
    assert path == out
    res = json.loads(out.read_text())
    assert (res["tokenizer_tokens"], res["output_rows"]) == (1000, 1024)
    s1 = res["stage1"]
    assert s1["samples"] == 2 and s1["branch_rows"] > 0
    assert s1["throughput_ratio_dump_over_bare"]["median"] > 0
    assert set(res["stage2"]) == {"2", "4"}
    for r in res["stage2"].values():
        a, s = r["work"]["align_ti"], r["work"]["sft"]
        assert s["body_tokens"] == s1["sequence_tokens"]  # the store holds the same samples
        assert s["head_rows"] == s1["response_tokens"]
        assert a["body_tokens"] == s["body_tokens"] + s1["branch_rows"]  # every stored branch row is read
        assert a["head_rows"] > s["head_rows"] + s1["branch_rows"]  # + the IVA rows
        assert r["flop_ratio"] > 1 and r["step_ratio"]["median"] > 0

    result = tmp_path / "memory.json"
    assert rv.main(["--child", "align_ti", "--child-batch", "2", "--student", str(work / "student"),
                    "--store", str(work / "store"), "--result", str(result)]) is None
    mem = json.loads(result.read_text())
    assert mem["peak_bytes"] >= mem["before_bytes"] > 0
    assert mem["peak_delta_bytes"] == mem["peak_bytes"] - mem["before_bytes"]

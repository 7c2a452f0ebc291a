"""Tiny vision-language models built from configs, offline, for tests and the demo.

Six families with different visual layouts:

* ``llava``: CLIP vision tower + MLP projector + Llama text model. Fixed square grid: every image
  is resized to ``image_size`` and becomes ``(image_size / patch)²`` tokens (CLS dropped).
* ``qwen2_vl``: Qwen2-VL with its own ViT, 2×2 patch merger and mRoPE (3-D position ids). The
  grid follows the image's aspect ratio, so two images of one sample may have different grids.
* ``qwen2_5_vl``: Qwen2.5-VL, the same token layout and mRoPE as Qwen2-VL; its ViT alternates
  windowed attention (windows of 2×2 merged cells, patches permuted into window order and back)
  with full attention.
* ``qwen3_vl``: Qwen3-VL, the same token layout; learned ViT position embeddings resampled to each
  grid, interleaved mRoPE sections (T H W T H W …) and "deepstack": features of the ViT's layers
  added to the visual positions' hidden states after the first decoder layers.
* ``idefics3``: Idefics3 (SigLIP-style ViT, pixel shuffle, Llama text). Tiled: an image larger than
  a tile is split into rows x cols tiles plus a global image, each tile a square block of visual
  tokens, with ``<fake_token_around_image><row_i_col_j>`` (``<global-img>`` for the global image)
  before each block. Here a 32 px image becomes 2 x 2 tiles of 16 px + the global image.
* ``internvl``: HF-native InternVL (InternViT-style ViT, pixel shuffle, Qwen2 text). Tiled: the
  image is cut into a grid of tiles chosen by aspect ratio (here exactly 2 tiles of 16 px) plus a
  thumbnail; all their blocks form one run of ``<IMG_CONTEXT>`` between ``<img>`` and ``</img>``.

All models share one byte-level BPE tokenizer trained in memory on a fixed corpus (deterministic),
with ChatML-style special tokens, so a student always has the teacher's tokenizer. The tiled
families' vision markers are added after training (``FAMILY_TOKENS``), at ids past the shared
vocabulary, so the other families' ids never change. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from pipeline.processors import (
    ImageOnlyInternVLProcessor,
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
)

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl")

PAD, BOS_TURN, EOS_TURN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
LLAVA_IMAGE = "<image>"
QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE, QWEN_VIDEO = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKENS = [PAD, BOS_TURN, EOS_TURN, LLAVA_IMAGE, QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE, QWEN_VIDEO]
IDEFICS_IMAGE, IDEFICS_AROUND, IDEFICS_GLOBAL, IDEFICS_END = (
    LLAVA_IMAGE,  # Idefics3's image token is "<image>" too
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
)
# InternVL's processor reads these from named tokenizer attributes (``tokenizer.start_image_token``, ...).
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# Vision markers of the tiled families, added after BPE training (ids >= the shared vocabulary).
FAMILY_TOKENS = {
    "idefics3": [IDEFICS_AROUND, IDEFICS_GLOBAL, IDEFICS_END]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    "internvl": list(INTERNVL_TOKENS.values()),
}
TILE = 16  # idefics3 / internvl: side of a tile (and of the global image / thumbnail) in pixels

# Words of the demo's visual questions plus ordinary chat text; the BPE learns merges from this.
_WORDS = (
    "red green blue yellow purple orange black white grey pink brown cyan "
    "circle square triangle star cross diamond shape shapes "
    "top bottom left right center middle upper lower row column corner grid cell position "
    "what which where how many is are there a an the of in at on to and or not yes no "
    "colour color count number zero one two three four five six seven eight nine ten "
    "above below next beside relative image picture question answer describe "
    "user assistant system you helpful please tell me this that it its "
)
_CORPUS = [
    _WORDS,
    _WORDS.title(),
    "What colour is the shape at the top left? The shape at the top left is red.",
    "How many blue shapes are there? There are 3 blue shapes.",
    "Is there a green circle in the image? Yes. No.",
    "Which shape is left of the yellow star? A: circle B: square C: triangle D: star",
    "Answer with a single word. Answer with the option's letter from the given choices directly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 . , ? ! : ; ' \" ( ) - _ / \n",
]


@lru_cache(maxsize=1)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512, family: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory (deterministic for a given vocab size), with
    ``family``'s vision markers (``FAMILY_TOKENS``) added as special tokens after the shared ones."""
    named = INTERNVL_TOKENS if family == "internvl" else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token=EOS_TURN,
        pad_token=PAD,
        model_max_length=4096,
        **({"extra_special_tokens": dict(named)} if named else {}),
    )
    extra = [t for t in FAMILY_TOKENS.get(family, []) if t not in tok.get_vocab()]
    if extra:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    tok.padding_side = "right"
    return tok


def chat_template(image_placeholder: str) -> str:
    """ChatML; an ``{"type": "image"}`` content item renders as ``image_placeholder``."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image_placeholder + "{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny VLM. ``patch`` sets the visual grid: a larger patch pools the grid."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    image_size: int = 32  # llava: square input side; qwen*: target side for min/max pixels;
    # idefics3: longest edge an image is resized to before it is split into TILE-px tiles
    patch: int = 8  # llava: ViT patch; qwen*: effective patch after the 2x2 merge;
    # idefics3, internvl: 4 x the pixel-shuffle factor (see _tile_vision)
    max_positions: int = 1024
    padded_rows: int = 0  # output-head rows beyond the tokenizer's tokens (real checkpoints pad, e.g. Qwen2 +418)


PRESETS = {
    "teacher": TinySpec(),
    "student": TinySpec(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
    # Same student with a visual grid pooled by 2 in each direction (4x fewer visual tokens).
    "student-pooled": TinySpec(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, patch=16),
    # For vLLM (tests/on_vllm): its CPU attention refuses head_dim 16 ("Unsupported CPU attention
    # configuration") and takes 32, so these keep the teacher's and student's widths with fewer,
    # wider heads (head_dim 64/2 and 32/1). Qwen-VL mRoPE sections then sum to 16 = head_dim / 2.
    "vllm-teacher": TinySpec(heads=2, kv_heads=1),
    "vllm-student": TinySpec(hidden=32, layers=1, heads=1, kv_heads=1, intermediate=64),
}


def _text_ids(tok: PreTrainedTokenizerFast, padded_rows: int = 0) -> dict:
    return dict(
        vocab_size=len(tok) + padded_rows,
        bos_token_id=tok.convert_tokens_to_ids(BOS_TURN),
        eos_token_id=tok.convert_tokens_to_ids(EOS_TURN),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
    )


def build_llava(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int = 0):
    if spec.image_size % spec.patch:
        raise ValueError(f"image_size {spec.image_size} is not a multiple of patch {spec.patch}")
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch,
    )
    text = LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        **_text_ids(tok, spec.padded_rows),
    )
    n_tokens = (spec.image_size // spec.patch) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
        image_seq_length=n_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=spec.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=LLAVA_IMAGE,
        chat_template=chat_template(LLAVA_IMAGE),
    )
    return model, processor


_QWEN_MERGE = 2


def _qwen_vit_patch(spec: TinySpec) -> int:
    if spec.patch % _QWEN_MERGE:
        raise ValueError(f"qwen patch {spec.patch} must be a multiple of the merge size {_QWEN_MERGE}")
    return spec.patch // _QWEN_MERGE


def _qwen_text(spec: TinySpec, tok: PreTrainedTokenizerFast, **rope) -> dict:
    """Text config of the Qwen-VL families: mRoPE splits head_dim/2 rotary frequencies into
    (temporal, height, width) sections."""
    half = spec.hidden // spec.heads // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **rope},
        **_text_ids(tok, spec.padded_rows),
    )


def _qwen_token_ids(tok: PreTrainedTokenizerFast) -> dict:
    return dict(
        image_token_id=tok.convert_tokens_to_ids(QWEN_IMAGE),
        video_token_id=tok.convert_tokens_to_ids(QWEN_VIDEO),
        vision_start_token_id=tok.convert_tokens_to_ids(QWEN_VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(QWEN_VISION_END),
    )


def _qwen_processor(cls, spec: TinySpec, tok: PreTrainedTokenizerFast):
    side = spec.image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=_qwen_vit_patch(spec),
        merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
        # Allow from a quarter to four times the nominal area; aspect ratio is kept.
        size={"shortest_edge": (side * side) // 4, "longest_edge": side * side * 4},
    )
    return cls(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=chat_template(QWEN_VISION_START + QWEN_IMAGE + QWEN_VISION_END),
    )


def build_qwen2_vl(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int = 0):
    vision = dict(
        depth=spec.vision_layers,
        embed_dim=spec.vision_hidden,
        hidden_size=spec.hidden,
        num_heads=spec.vision_heads,
        patch_size=_qwen_vit_patch(spec),
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(text_config=_qwen_text(spec, tok), vision_config=vision, **_qwen_token_ids(tok))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    return model, _qwen_processor(ImageOnlyQwen2VLProcessor, spec, tok)


def build_qwen2_5_vl(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int = 0):
    # 2 ViT blocks per vision layer: windowed then full attention, as the real model interleaves them.
    depth = 2 * spec.vision_layers
    vision = dict(
        depth=depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden,
        patch_size=_qwen_vit_patch(spec),
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
        window_size=2 * spec.patch,  # in pixels: windows of 2x2 merged cells
        fullatt_block_indexes=list(range(1, depth, 2)),
    )
    config = Qwen2_5_VLConfig(text_config=_qwen_text(spec, tok), vision_config=vision, **_qwen_token_ids(tok))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model, _qwen_processor(ImageOnlyQwen2_5_VLProcessor, spec, tok)


def build_qwen3_vl(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int = 0):
    # Every ViT block feeds a deepstack merger: its features are added to the visual positions
    # after decoder layers 0, 1, ... (as many as there are ViT blocks, at most the decoder's depth).
    depth = 2 * spec.vision_layers
    vision = dict(
        depth=depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden,
        patch_size=_qwen_vit_patch(spec),
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
        num_position_embeddings=64,  # an 8x8 learned grid, resampled bilinearly to each image's patches
        deepstack_visual_indexes=list(range(depth)),
    )
    text = _qwen_text(spec, tok, mrope_interleaved=True)
    text["head_dim"] = spec.hidden // spec.heads
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tok))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    return model, _qwen_processor(ImageOnlyQwen3VLProcessor, spec, tok)


def _tile_vision(spec: TinySpec) -> tuple[int, int]:
    """(ViT patch, pixel-shuffle factor) of a tiled family: 2-px ViT patches on TILE-px tiles, merged
    ``spec.patch // 4`` x ``spec.patch // 4`` (teacher: factor 2, 4x4 tokens per tile; the pooled
    student's patch 16: factor 4, 2x2 tokens per tile)."""
    vit_patch, factor = 2, spec.patch // 4
    if spec.patch % 4 or factor < 1 or (TILE // vit_patch) % factor:
        raise ValueError(f"patch {spec.patch} gives no pixel-shuffle factor that divides {TILE}-px tiles of {vit_patch}-px patches")
    return vit_patch, factor


def _tile_configs(spec: TinySpec, tok: PreTrainedTokenizerFast, text_model: str, vit_patch: int) -> tuple[dict, dict]:
    """(text config, vision config) of a tiled family: a ``text_model`` decoder and a ViT over TILE-px tiles."""
    text = dict(
        model_type=text_model,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        **_text_ids(tok, spec.padded_rows),
    )
    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=TILE,
        patch_size=vit_patch,
    )
    return text, vision


def build_idefics3(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int = 0):
    vit_patch, factor = _tile_vision(spec)
    text, vision = _tile_configs(spec, tok, "llama", vit_patch)
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=factor,
        image_token_id=tok.convert_tokens_to_ids(IDEFICS_IMAGE),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": spec.image_size},  # then split into TILE-px tiles + a global image
        max_image_size={"longest_edge": TILE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=(TILE // vit_patch // factor) ** 2,
        chat_template=chat_template(IDEFICS_IMAGE),
    )
    return model, processor


def build_internvl(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int = 0):
    vit_patch, factor = _tile_vision(spec)
    text, vision = _tile_configs(spec, tok, "qwen2", vit_patch)
    per_tile = (TILE // vit_patch // factor) ** 2
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        downsample_ratio=1.0 / factor,
        image_token_id=tok.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
        image_seq_length=per_tile,
        # Untied, as the other tiny families: a random-init model with tied embeddings predicts the
        # token it reads, so any two tiny models would agree on every top-1.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        crop_to_patches=True,
        min_patches=2,  # exactly two tiles (1x2 or 2x1 by aspect ratio), then the thumbnail
        max_patches=2,
    )
    processor = ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=per_tile,
        chat_template=chat_template(INTERNVL_TOKENS["context_image_token"]),
    )
    return model, processor


def build_tiny_vlm(family: str, spec: TinySpec | str = "teacher", seed: int = 0, vocab_size: int = 512):
    """(model, processor) of a tiny VLM of ``family``; ``spec`` is a TinySpec or a preset name."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown tiny preset {spec!r}; choose from {sorted(PRESETS)}")
        spec = PRESETS[spec]
    builders = {"llava": build_llava, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl,
                "idefics3": build_idefics3, "internvl": build_internvl}
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose from {list(FAMILIES)}")
    tok = build_tokenizer(vocab_size, family)
    model, processor = builders[family](spec, tok, seed)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(EOS_TURN)
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids(PAD)
    return model.eval(), processor


def save_tiny_vlm(out_dir: str | Path, family: str, spec: TinySpec | str = "teacher", seed: int = 0) -> Path:
    """Build a tiny VLM and save model + processor as an HF checkpoint directory."""
    out = Path(out_dir)
    model, processor = build_tiny_vlm(family, spec, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_parts(out_dir: str | Path, spec: TinySpec | str = "student", seed: int = 0) -> tuple[Path, Path]:
    """A tiny causal LM (``out/lm``, with the shared tokenizer) and a tiny CLIP vision encoder
    (``out/vision``, with its image processor): the parts a composed student is built from."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    if isinstance(spec, str):
        spec = PRESETS[spec]
    out = Path(out_dir)
    tok = build_tokenizer()
    model, processor = build_llava(spec, tok, seed)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(model.config.text_config)
    lm.generation_config.eos_token_id = tok.convert_tokens_to_ids(EOS_TURN)
    lm.save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")
    vision = CLIPVisionModel(model.config.vision_config)
    vision.save_pretrained(out / "vision")
    processor.image_processor.save_pretrained(out / "vision")
    return out / "lm", out / "vision"

"""The teacher signals of one sample and how they map onto store arrays (DESIGN.md §3, §5).

Stage 1 fills a :class:`SampleSignals` per sample and :func:`pack` turns it into index metadata and
flat array rows; Stage 2 and ``pipeline inspect`` read them back with :func:`unpack`. Arrays (one
row per entry, a sample's rows contiguous, offsets in the Parquet index):

==================  =========  ===========  =====================================================
array               dtype      row shape    one row per
==================  =========  ===========  =====================================================
resp_pos            int32      ()           response position t (x_{t+1} is a labelled token)
resp_ids            int32      (k,)         response position: top-k ids of p_T(.|x<=t)
resp_logprobs       float32    (k,)         response position: their exact log-probs
resp_sample_n       int16      ()           response position: unique sampled ids   [sampled: response]
resp_sample_ids     int32      ()           sampled unique id (flat, resp_sample_n per position)
resp_sample_counts  int16      ()           its count out of ``draws``
saliency            float16    ()           (turn, visual position): s_j[v], turn-major
vis_pos             int32      ()           stored visual position v (the most salient fraction)
vis_weight          float32    ()           s̄[v], the turn-mean saliency at v (not renormalised)
vis_ids             int32      (k,)         stored visual position: top-k ids of p_T(.|x<=v)
vis_logprobs        float32    (k,)         their exact log-probs
vis_sample_n        int16      ()           stored visual position: unique sampled ids   [sampled: visual]
vis_sample_ids      int32      ()           sampled unique id (flat, vis_sample_n per position)
vis_sample_counts   int16      ()           its count out of ``draws``
tpa_pos             int32      ()           branch row (t, c): the position t               [transitions]
tpa_cand            int32      ()           branch row: candidate token c
tpa_cand_logprob    float32    ()           branch row: log p_T(c|x<=t)
tpa_ids             int32      (k',)        branch row: top-k' ids of p_T(.|x<=t, c)
tpa_logprobs        float32    (k',)        their exact log-probs
tpa_sample_n        int16      ()           branch row: unique sampled ids of p_T(.|x<=t, c)  [sampled: transitions]
tpa_sample_ids      int32      ()           sampled unique id (flat, tpa_sample_n per branch row)
tpa_sample_counts   int16      ()           its count out of ``draws``
==================  =========  ===========  =====================================================

Sampled targets (``signals.sampled``): ``draws`` ids drawn with replacement from the row's
distribution (the same float32 log-softmax as its top-k), stored as unique ids with counts, for the
row kinds ``signals.sampled.rows`` names (:data:`SAMPLED_ROWS`: response by default; visual and
transition rows on request). A store without a kind's arrays (one dumped before they existed, or
without that kind) reads as before: the kind's fields are None.

Log-probs are float32: they are "exact" by contract and the tail mass 1 - sum(exp) is derived from
them. Saliency is float16 as the design fixes (it is a weight, not a probability target).

That table is what every reader sees. How the sparse distributions are stored on disk is the store's
profile (:func:`store_codecs`): ``exact`` keeps the table as it is; ``compact`` stores each
``<x>_ids``/``<x>_logprobs`` pair with a codec (``schemas.codecs``) that the reader decodes back to
it, with fewer ids per row (-1 padding) and log-probs quantised around the exact tail mass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.codecs import CODECS_KEY, StoreCodecs, TopkCodec
from schemas.errors import StoreFormatError
from schemas.layout import ARRAYS_DIR, INDEX_NAME, SHARD_JSON, SHARDS_DIR, ArraySpec, StoredSample, list_complete_shards
from schemas.meta_columns import json_field

META_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("length", pa.int32()),
        json_field("image_hashes"),
        json_field("visual_blocks"),
        json_field("turns"),
    ]
)


# The row kinds that can carry a sampled target (``signals.sampled.rows``) and their arrays' prefix.
SAMPLED_ROWS = {"response": "resp", "visual": "vis", "transitions": "tpa"}


def sampled_arrays(prefix: str) -> list[str]:
    """The three arrays of one row kind's sampled target (``<prefix>_sample_n/_ids/_counts``)."""
    return [f"{prefix}_sample_n", f"{prefix}_sample_ids", f"{prefix}_sample_counts"]


# The arrays of each signal, for byte accounting (the manifest's ``signal_bytes``, bench/store_bytes.py).
SIGNAL_GROUPS = {
    "response_topk": ["resp_pos", "resp_ids", "resp_logprobs"],
    "response_sampled": sampled_arrays("resp"),
    "saliency": ["saliency"],
    "visual_topk": ["vis_pos", "vis_weight", "vis_ids", "vis_logprobs"],
    "visual_sampled": sampled_arrays("vis"),
    "transitions": ["tpa_pos", "tpa_cand", "tpa_cand_logprob", "tpa_ids", "tpa_logprobs"],
    "transitions_sampled": sampled_arrays("tpa"),
}


def signal_bytes(store: Path) -> dict:
    """Stored bytes of each signal group (and of the index), in total and per response token
    (compressed, on disk), from the complete shards' ``shard.json``."""
    total: dict[str, int] = {}
    n_resp = 0
    for name in list_complete_shards(store):
        shard = json.loads((Path(store) / SHARDS_DIR / name / SHARD_JSON).read_text())
        codecs = StoreCodecs.from_json(shard.get(CODECS_KEY), f"shard {name!r}")
        n_resp += shard["rows"].get("resp_pos", 0)
        for rel, f in shard["files"].items():
            parts = Path(rel).parts
            # an array stored with a codec counts for the signal of the array it holds
            key = codecs.source_of(parts[1]) if parts[0] == ARRAYS_DIR and len(parts) > 2 else "index"
            total[key] = total.get(key, 0) + f["bytes"]
    out: dict = {"response_tokens": n_resp}
    for g, names in {**SIGNAL_GROUPS, "index": ["index"]}.items():
        b = sum(total.get(n, 0) for n in names)
        if b:
            out[g] = {"bytes": b, "bytes_per_response_token": b / max(1, n_resp)}
    return out


def sees_image(instruction: list[int], first_visual: int | None) -> bool:
    """Can a turn with these instruction positions see a visual token (one before it, causally),
    given the sample's first visual position (None: no image)? A turn that cannot has no saliency
    map (DESIGN.md §3.2): an all-zero row, no IVA weight. The one rule; the probe and the checks use it."""
    return bool(instruction) and first_visual is not None and max(instruction) > first_visual


def turn_sees_image(instruction: list[int], visual_blocks: list[dict]) -> bool:
    """:func:`sees_image` from a sample's stored ``visual_blocks`` meta."""
    starts = [int(b["start"]) for b in visual_blocks if int(b["length"]) > 0]
    return sees_image(instruction, min(starts) if starts else None)


def saliency_coverage(store: Path) -> dict:
    """Turns of samples with images, and how many of them have no saliency map, from the complete
    shards' indexes (meta columns only, no array reads)."""
    with_images = without_map = 0
    for name in list_complete_shards(store):
        table = pq.read_table(Path(store) / SHARDS_DIR / name / INDEX_NAME, columns=["turns", "visual_blocks"])
        for turns, blocks in zip(table.column("turns").to_pylist(), table.column("visual_blocks").to_pylist()):
            turns, blocks = json.loads(turns), json.loads(blocks)
            if not blocks:
                continue
            with_images += len(turns)
            without_map += sum(not turn_sees_image(t["instruction"], blocks) for t in turns)
    return {"turns_with_images": with_images, "turns_without_map": without_map}


def array_specs(top_k: int, transition_top_k: int, sampled: bool, transitions: bool,
                sampled_rows: list[str] | tuple[str, ...] = ("response",)) -> dict[str, ArraySpec]:
    """The store's arrays: ``sampled`` adds the sampled targets of the row kinds ``sampled_rows``
    names (keys of :data:`SAMPLED_ROWS`), ``transitions`` the branch rows."""
    unknown = [r for r in sampled_rows if r not in SAMPLED_ROWS] if sampled else []
    if unknown:
        raise ValueError(f"unknown sampled row kind(s) {unknown}; valid: {', '.join(SAMPLED_ROWS)}")
    if sampled and "transitions" in sampled_rows and not transitions:
        raise ValueError("sampled targets for transition rows need transitions")
    specs = {
        "resp_pos": ArraySpec("int32"),
        "resp_ids": ArraySpec("int32", (top_k,)),
        "resp_logprobs": ArraySpec("float32", (top_k,)),
        "saliency": ArraySpec("float16"),
        "vis_pos": ArraySpec("int32"),
        "vis_weight": ArraySpec("float32"),
        "vis_ids": ArraySpec("int32", (top_k,)),
        "vis_logprobs": ArraySpec("float32", (top_k,)),
    }
    specs |= _sampled_specs("response", sampled, sampled_rows)  # where it always was: older stores' order
    if transitions:
        specs |= {
            "tpa_pos": ArraySpec("int32"),
            "tpa_cand": ArraySpec("int32"),
            "tpa_cand_logprob": ArraySpec("float32"),
            "tpa_ids": ArraySpec("int32", (transition_top_k,)),
            "tpa_logprobs": ArraySpec("float32", (transition_top_k,)),
        }
    return specs | _sampled_specs("visual", sampled, sampled_rows) | _sampled_specs("transitions", sampled, sampled_rows)


def _sampled_specs(kind: str, sampled: bool, sampled_rows) -> dict[str, ArraySpec]:
    if not (sampled and kind in sampled_rows):
        return {}
    n, ids, counts = sampled_arrays(SAMPLED_ROWS[kind])
    return {n: ArraySpec("int16"), ids: ArraySpec("int32"), counts: ArraySpec("int16")}


# The sparse distributions (ids + log-probs per row) and the prefix of their stored arrays under a codec.
TOPK_SIGNALS = {"resp": ("resp_ids", "resp_logprobs"), "vis": ("vis_ids", "vis_logprobs"),
                "tpa": ("tpa_ids", "tpa_logprobs")}
PROFILES = ("exact", "compact")


def store_codecs(profile: str, specs: dict[str, ArraySpec], vocab_size: int, max_kl: float = 1e-3,
                 step: float = 1.0 / 16, max_dropped: float = 0.0) -> StoreCodecs:
    """The codecs of a store profile (DESIGN.md §5): ``exact`` stores every array as it is;
    ``compact`` stores each sparse distribution of ``specs`` with :class:`schemas.codecs.TopkCodec`
    (the fewest ids within ``max_kl`` nats of the exact row and dropping at most ``max_dropped`` of its
    mass, bit-packed ids, log-probs quantised at ``step`` nats, the tail mass exact). ``vocab_size``: the real tokens (every id is below it)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown store profile {profile!r}; profiles: {', '.join(PROFILES)}")
    if profile == "exact":
        return StoreCodecs()
    return StoreCodecs([
        TopkCodec(ids=ids, logprobs=lps, prefix=f"{prefix}_topk", k=specs[ids].row_shape[0],
                  vocab_size=vocab_size, step=step, max_kl=max_kl, max_dropped=max_dropped)
        for prefix, (ids, lps) in TOPK_SIGNALS.items() if ids in specs
    ])


def _empty(*shape, dtype=np.float32) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


@dataclass
class SampleSignals:
    """Everything Stage 1 stores for one sample (numpy, in memory)."""

    sample_id: str
    input_ids: np.ndarray  # int [T]
    visual_blocks: list[dict]  # [{"image_index", "start", "length", "grid": [rows, cols]}]
    turns: list[dict]  # [{"instruction": [...], "response": [...]}]
    image_hashes: list[str]
    resp_pos: np.ndarray  # [R]
    resp_ids: np.ndarray  # [R, k]
    resp_logprobs: np.ndarray  # [R, k]
    saliency: np.ndarray  # [n_turns, |V|] (n_turns = 0 for text-only samples)
    vis_pos: np.ndarray  # [P]
    vis_weight: np.ndarray  # [P]
    vis_ids: np.ndarray  # [P, k]
    vis_logprobs: np.ndarray  # [P, k]
    sample_ids: np.ndarray | None = None  # [R, m] padded with -1   (sampled target)
    sample_counts: np.ndarray | None = None  # [R, m] padded with 0
    tpa_pos: np.ndarray | None = None  # [B]
    tpa_cand: np.ndarray | None = None  # [B]
    tpa_cand_logprob: np.ndarray | None = None  # [B]
    tpa_ids: np.ndarray | None = None  # [B, k']
    tpa_logprobs: np.ndarray | None = None  # [B, k']
    vis_sample_ids: np.ndarray | None = None  # [P, m] padded with -1   (sampled target of the visual rows)
    vis_sample_counts: np.ndarray | None = None  # [P, m] padded with 0
    tpa_sample_ids: np.ndarray | None = None  # [B, m] padded with -1   (sampled target of the branch rows)
    tpa_sample_counts: np.ndarray | None = None  # [B, m] padded with 0
    extra: dict = field(default_factory=dict)

    @property
    def n_visual(self) -> int:
        return int(sum(b["length"] for b in self.visual_blocks))

    def sampled(self, prefix: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(ids, counts) of the sampled target of the rows ``prefix`` names (resp, vis, tpa)."""
        if prefix == "resp":
            return self.sample_ids, self.sample_counts
        return getattr(self, f"{prefix}_sample_ids"), getattr(self, f"{prefix}_sample_counts")


def pack(s: SampleSignals, specs: dict[str, ArraySpec]) -> tuple[dict, dict[str, np.ndarray]]:
    """Index metadata and array rows of one sample, in the dtypes of ``specs``."""
    meta = {
        "input_ids": [int(x) for x in s.input_ids],
        "length": int(len(s.input_ids)),
        "image_hashes": list(s.image_hashes),
        "visual_blocks": s.visual_blocks,
        "turns": s.turns,
    }
    arrays = {
        "resp_pos": s.resp_pos,
        "resp_ids": s.resp_ids,
        "resp_logprobs": s.resp_logprobs,
        "saliency": s.saliency.reshape(-1),
        "vis_pos": s.vis_pos,
        "vis_weight": s.vis_weight,
        "vis_ids": s.vis_ids,
        "vis_logprobs": s.vis_logprobs,
    }
    if "tpa_pos" in specs:
        if s.tpa_pos is None:
            raise ValueError(f"sample {s.sample_id!r}: the store expects transitions but none were computed")
        arrays |= {
            "tpa_pos": s.tpa_pos,
            "tpa_cand": s.tpa_cand,
            "tpa_cand_logprob": s.tpa_cand_logprob,
            "tpa_ids": s.tpa_ids,
            "tpa_logprobs": s.tpa_logprobs,
        }
    for kind, prefix in SAMPLED_ROWS.items():
        n_name, ids_name, counts_name = sampled_arrays(prefix)
        if ids_name not in specs:
            continue
        ids, counts = s.sampled(prefix)
        if ids is None or counts is None:
            raise ValueError(f"sample {s.sample_id!r}: the store expects sampled targets of the {kind} rows "
                             "but none were computed")
        valid = counts > 0
        arrays |= {n_name: valid.sum(axis=1), ids_name: ids[valid], counts_name: counts[valid]}
    return meta, {name: np.asarray(a).astype(specs[name].dtype, copy=False) for name, a in arrays.items()}


def unpack(stored: StoredSample) -> SampleSignals:
    """The inverse of :func:`pack` (saliency back to [n_turns, |V|], sampled targets re-padded)."""
    m, a = stored.meta, stored.arrays
    missing = [k for k in META_SCHEMA.names if k not in m]
    if missing:
        raise StoreFormatError(f"sample {stored.sample_id!r}: the store's index has no {', '.join(map(repr, missing))} "
                               "column; not a teacher store of this format")
    blocks = m["visual_blocks"]
    n_visual = int(sum(b["length"] for b in blocks))
    sal = a["saliency"].astype(np.float32)
    saliency = sal.reshape(-1, n_visual) if n_visual else _empty(0, 0)
    sample_ids, sample_counts = _unpack_sampled(a, "resp", stored.sample_id)
    vis_sample_ids, vis_sample_counts = _unpack_sampled(a, "vis", stored.sample_id)
    tpa_sample_ids, tpa_sample_counts = _unpack_sampled(a, "tpa", stored.sample_id)
    get = a.get
    return SampleSignals(
        sample_id=stored.sample_id,
        input_ids=np.asarray(m["input_ids"], dtype=np.int64),
        visual_blocks=blocks,
        turns=m["turns"],
        image_hashes=m["image_hashes"],
        resp_pos=a["resp_pos"].astype(np.int64),
        resp_ids=a["resp_ids"].astype(np.int64),
        resp_logprobs=a["resp_logprobs"],
        saliency=saliency,
        vis_pos=a["vis_pos"].astype(np.int64),
        vis_weight=a["vis_weight"],
        vis_ids=a["vis_ids"].astype(np.int64),
        vis_logprobs=a["vis_logprobs"],
        sample_ids=sample_ids,
        sample_counts=sample_counts,
        tpa_pos=None if get("tpa_pos") is None else a["tpa_pos"].astype(np.int64),
        tpa_cand=None if get("tpa_cand") is None else a["tpa_cand"].astype(np.int64),
        tpa_cand_logprob=get("tpa_cand_logprob"),
        tpa_ids=None if get("tpa_ids") is None else a["tpa_ids"].astype(np.int64),
        tpa_logprobs=get("tpa_logprobs"),
        vis_sample_ids=vis_sample_ids,
        vis_sample_counts=vis_sample_counts,
        tpa_sample_ids=tpa_sample_ids,
        tpa_sample_counts=tpa_sample_counts,
    )


def _unpack_sampled(a: dict[str, np.ndarray], prefix: str, sample_id: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One row kind's sampled target re-padded to (ids [n, m] -1 padded, counts [n, m] 0 padded),
    ``m`` the widest row; (None, None) when the store has none for that kind."""
    n_name, ids_name, counts_name = sampled_arrays(prefix)
    if n_name not in a:
        return None, None
    n = a[n_name].astype(np.int64)
    if not (len(a[ids_name]) == len(a[counts_name]) == int(n.sum())):
        raise StoreFormatError(f"sample {sample_id!r}: {ids_name}/{counts_name} hold {len(a[ids_name])}/"
                               f"{len(a[counts_name])} entries, {n_name} sums to {int(n.sum())}")
    width = int(n.max()) if n.size else 0
    ids = np.full((len(n), width), -1, dtype=np.int64)
    counts = np.zeros((len(n), width), dtype=np.int64)
    row = np.repeat(np.arange(len(n)), n)  # each flat entry's row, and its column in that row
    col = np.arange(len(row)) - (np.cumsum(n) - n)[row]
    ids[row, col] = a[ids_name]
    counts[row, col] = a[counts_name]
    return ids, counts

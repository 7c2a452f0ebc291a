"""Stage 2 loader throughput: StoreDataset against raw memory-mapped arrays of the same data.

Modes, each a whole epoch over the same samples, timed in interleaved rounds:

* store w0      one ``DataLoader(StoreDataset(repeat=True), batch_size=None, num_workers=0)`` for
                all rounds, one epoch of batches per round: what ``distill`` runs with
                ``data.num_workers=0`` (one loader per run). Steady state: the reader keeps its
                decoded chunks and the encoder its preprocessed images from epoch to epoch; per
                sample it still reads the block, unpacks, builds the student's ids, labels and
                positions from the stored teacher ids, remaps and collates.
* store w0 cold the same with both caches off (``image_cache_mb=0, read_cache_mb=0``), a fresh
                loader per epoch: every block read decodes zarr chunks, every image is read,
                hashed, decoded and preprocessed. What a store larger than the caches pays.
* store w0 pixels both RAM caches off as in cold, with a pixel cache directory
                (``pixel_cache_dir``) filled by one untimed epoch before the rounds: every block
                read decodes zarr chunks, every image's tensors are read from the directory (no
                image file, no processor). What the second and later epochs of a dataset larger
                than the RAM caches pay.
* store w0 old  caches off and ``encoding="processor"``: chat template + tokenizer + processor on
                every sample (the path before the store fast path).
* store w2 fresh 2 worker processes (prefetch 4) with a fresh DataLoader per epoch (worker start-up
                and cold worker caches every epoch: what ``distill`` did before one loader per run).
* read_block    ``StoreReader.read_block`` alone over every block of the epoch, a new reader
                without a cache (zarr + Parquet); ``read_block warm``: an open reader with the cache.
* raw full      every array a batch is built from (student token ids, labels, preprocessed
                pixel_values, response top-k, IVA rows, TPA rows), written once in their final
                dtypes to ``np.memmap`` (.npy) files with per-sample offsets; a pass slices them
                and calls the same ``collate``: the tensors equal the store path's (checked).
* raw tokens    only token ids, labels and the response top-k ids/logprobs from memmaps, built
                into input_ids / attention_mask / labels / KD rows (checked equal to the store's).

Compact store (``signals.codec.profile=compact``; the same store recoded, ``stage1_teacher.recode``):

* compact w0, compact w0 cold, compact read_block: store w0, store w0 cold and read_block on it. The
  batches are checked equal in ids and within the codec's log-prob step of the exact store's; the
  table gives each compact mode's throughput over its exact twin (target >= 1: no slower).
  ``--codec-only`` times just these pairs and the raw modes (no w2, no phase breakdown).

After the rounds, ``store w2``: one DataLoader with 2 workers for consecutive epochs (its workers
prefetch, so it cannot alternate with the other modes), against the median raw epoch.

Target: store w0 samples/s >= 0.5 x raw full. Loader rates do not depend on the teacher's size, so
the store is dumped by a small teacher with the benchmark geometry (64x64 images, 64 visual tokens,
top-k 64, transitions with p_min = 0 as in distill_step.py). Instrumented store w0 passes (warm and
cold) split the store path into its phases (``common.clocked``).

    python bench/loader.py [--quick] [--device cuda --dtype bfloat16]   (device: the dump's teacher only)
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from dataclasses import fields, is_dataclass, replace
from types import SimpleNamespace

from common import (
    BENCH_SPEC,
    Workdir,
    base_parser,
    build_shapes_data,
    build_teacher,
    check_device,
    clocked,
    dump_config,
    environment,
    fmt_spread,
    interleaved,
    load_average,
    per_rep_ratio,
    round_sums,
    spec_dict,
    stats,
    table,
    write_results,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402  (after common: it sets up sys.path and offline mode)
from torch.utils.data import DataLoader  # noqa: E402

import stage2_student.data.dataset as dataset_module  # noqa: E402
import stage2_student.data.reencode as reencode_module  # noqa: E402
from pipeline.data import Record  # noqa: E402
from pipeline.data.encode import IGNORE_INDEX  # noqa: E402
from pipeline.processors import load_processor  # noqa: E402
from schemas import StoreReader  # noqa: E402
from schemas.reader import _ShardIndex  # noqa: E402
from stage1_teacher.config import CodecConfig  # noqa: E402
from stage1_teacher.dump import run as dump  # noqa: E402
from stage1_teacher.recode import recode  # noqa: E402
from stage2_student.data import StoreDataset, StudentTargets, collate, epoch_order, epoch_samples  # noqa: E402
from stage2_student.data.pixel_cache import PixelCache  # noqa: E402
from stage2_student.data.reencode import StudentEncoder  # noqa: E402

TARGET = 0.5
# Each compact mode and its exact twin (their throughput ratio: compact / exact, target >= 1).
CODEC_PAIRS = {"compact w0": "store w0", "compact w0 cold": "store w0 cold", "compact read_block": "read_block"}

# Loader rates depend on the store's contents (geometry, k, rows), not on the teacher's width.
DUMP_SPEC = replace(BENCH_SPEC, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=344)

# StudentTargets fields in the raw layout, with their dtypes in a batch.
_TARGET_ARRAYS = {
    "labels": np.int64,
    "resp_pos": np.int64,
    "resp_ids": np.int64,
    "resp_logprobs": np.float32,
    "vis_pos": np.int64,
    "vis_weight": np.float32,
    "vis_ids": np.int64,
    "vis_logprobs": np.float32,
    "tpa_pos": np.int64,
    "tpa_cand": np.int64,
    "tpa_cand_logprob": np.float32,
    "tpa_ids": np.int64,
    "tpa_logprobs": np.float32,
}
_MINIMAL = ("input_ids", "labels", "resp_pos", "resp_ids", "resp_logprobs")


def codec_ratios(times: dict, n_samples: int) -> dict:
    """Print and return each compact mode's throughput over its exact twin's, per round."""
    ratios = {c: per_rep_ratio(times[e], times[c]) for c, e in CODEC_PAIRS.items() if c in times}
    rows = [[c, fmt_spread(stats(times[e])), fmt_spread(stats(times[c])), fmt_spread(ratios[c])] for c, e in CODEC_PAIRS.items()
            if c in times]
    print(f"\ncompact vs exact store ({n_samples} samples; throughput ratio compact / exact per round, >= 1: no slower)")
    print(table(["mode", "exact s/epoch", "compact s/epoch", "compact / exact"], rows))
    return {"compact_over_exact": ratios}


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128, help="synthetic records (multi-turn)")
    p.add_argument("--turns", type=int, default=3, help="question/answer turns per record")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="timed epochs per mode (interleaved)")
    p.add_argument("--codec-only", action="store_true", help="time only the exact/compact pairs and the raw modes")
    p.add_argument("--logit-scale", type=float, default=1.0,
                   help="scale of the random teacher's output head (25: as peaked as a trained teacher, see "
                        "store_bytes.py); how many ids a compact row keeps, hence its bytes, depends on it")
    args = p.parse_args()
    if args.quick:
        args.samples, args.reps = min(args.samples, 32), min(args.reps, 2)
    return args


class RawArrays:
    """Per-sample arrays concatenated along axis 0 in one .npy memmap per name, with offsets."""

    def __init__(self, root, per_sample: dict[str, list[np.ndarray]]):
        root.mkdir(parents=True, exist_ok=True)
        self.data, self.offsets = {}, {}
        for name, arrays in per_sample.items():
            flat = np.concatenate(arrays)
            mm = np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=flat.dtype, shape=flat.shape)
            mm[:] = flat
            mm.flush()
            del mm
            self.data[name] = np.load(root / f"{name}.npy", mmap_mode="r")
            self.offsets[name] = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

    def get(self, name: str, i: int) -> np.ndarray:
        o = self.offsets[name]
        return np.array(self.data[name][o[i] : o[i + 1]])  # a copy: the read


def assert_same(a, b, where: str) -> None:
    """Tensors, lists, dicts and dataclasses of them equal (NaN/-inf padding compare equal)."""
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
            raise AssertionError(f"{where}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    elif is_dataclass(a):
        for f in fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        if sorted(a) != sorted(b):
            raise AssertionError(f"{where}: keys {sorted(a)} vs {sorted(b)}")
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k}]")
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise AssertionError(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif a != b:
        raise AssertionError(f"{where}: {a!r} vs {b!r}")


def main() -> None:
    args = parse_args()
    check_device(args.device)

    with Workdir(args.workdir, "loader") as work:
        print(f"building a teacher {DUMP_SPEC}, {args.samples} synthetic records and the store in {work}", flush=True)
        teacher_dir = build_teacher(work / "teacher", DUMP_SPEC, logit_scale=args.logit_scale)
        data = build_shapes_data(work / "data", args.samples, args.turns)
        store = work / "store"
        dump(
            dump_config(
                teacher_dir,
                data,
                store,
                {
                    "teacher.device": args.device,
                    "teacher.dtype": args.dtype,
                    "signals.saliency_layers": [DUMP_SPEC.layers // 2],
                    "signals.transitions.min_prob": 0.0,
                    "workers": 0,
                },
            )
        )
        compact_store = work / "store-compact"
        recode(store, compact_store, CodecConfig(profile="compact"))
        processor = load_processor(teacher_dir)  # the student's: same tokenizer, template and geometry
        ds = StoreDataset(store, processor, batch_size=args.batch_size, seed=0, with_saliency=False)
        shard_sizes = ds.shard_sizes
        store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())

        # The raw layout: every sample's final arrays, in storage order (shard by shard).
        print("writing the raw memmap arrays", flush=True)
        reader = StoreReader(store)
        base, sample_ids, samples = {}, [], []
        for shard, n in shard_sizes.items():
            base[shard] = len(sample_ids)
            for stored in reader.read_block(shard, 0, n):
                enc, tg = ds.encode_and_remap(stored)
                sample_ids.append(tg.sample_id)
                arrays = {"input_ids": enc.input_ids.astype(np.int64)}
                for key, value in enc.model_inputs.items():
                    if key not in ("input_ids", "attention_mask"):
                        arrays[key] = value.numpy()  # image tensors, [n_images, ...]
                arrays |= {name: np.asarray(getattr(tg, name), dtype=dt) for name, dt in _TARGET_ARRAYS.items()}
                samples.append(arrays)
        like = {k: a for s in samples for k, a in s.items()}  # one array of each name, for empty rows
        per_sample = {k: [s.get(k, np.zeros((0, *a.shape[1:]), a.dtype)) for s in samples] for k, a in like.items()}
        image_keys = [k for k in per_sample if k not in _TARGET_ARRAYS and k != "input_ids"]
        del samples
        raw = RawArrays(work / "raw", per_sample)
        raw_bytes = sum((work / "raw" / f"{n}.npy").stat().st_size for n in per_sample)
        raw_min_bytes = sum((work / "raw" / f"{n}.npy").stat().st_size for n in _MINIMAL)
        del per_sample

        order = [base[shard] + idx for shard, idx in epoch_samples(0, 0, shard_sizes, ds.block_size, ds.window_blocks)]
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        n_samples = len(order)

        def raw_full_batch(b: int):
            encoded, targets = [], []
            for i in batches[b]:
                ids = raw.get("input_ids", i)
                inputs = {"input_ids": torch.from_numpy(ids)[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.int64)}
                inputs |= {k: torch.from_numpy(raw.get(k, i)) for k in image_keys if raw.offsets[k][i + 1] > raw.offsets[k][i]}
                encoded.append(SimpleNamespace(model_inputs=inputs))
                targets.append(StudentTargets(
                    sample_id=sample_ids[i], saliency=np.zeros((0, 0), np.float32),
                    **{name: raw.get(name, i) for name in _TARGET_ARRAYS},
                ))
            return collate(encoded, targets, ds.pad_id, position=(0, b), with_saliency=False)

        def raw_tokens_batch(b: int) -> dict:
            rows = {name: [raw.get(name, i) for i in batches[b]] for name in _MINIMAL}
            length = max(len(x) for x in rows["input_ids"])
            input_ids = np.full((len(batches[b]), length), ds.pad_id, dtype=np.int64)
            mask = np.zeros((len(batches[b]), length), dtype=np.int64)
            labels = np.full((len(batches[b]), length), IGNORE_INDEX, dtype=np.int64)
            for j, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
                input_ids[j, : len(ids)], mask[j, : len(ids)], labels[j, : len(lab)] = ids, 1, lab
            counts = [len(p) for p in rows["resp_pos"]]
            return {
                "input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels),
                "kd_batch": torch.as_tensor(np.repeat(np.arange(len(counts)), counts), dtype=torch.int64),
                "kd_pos": torch.from_numpy(np.concatenate(rows["resp_pos"])),
                "kd_ids": torch.from_numpy(np.concatenate(rows["resp_ids"])),
                "kd_logprobs": torch.from_numpy(np.concatenate(rows["resp_logprobs"])),
            }

        # The raw paths build what the store path builds.
        store_batches = list(DataLoader(ds, batch_size=None, num_workers=0))
        if len(store_batches) != len(batches):
            raise AssertionError(f"{len(store_batches)} store batches vs {len(batches)} raw batches")
        for b, sb in enumerate(store_batches):
            assert_same(raw_full_batch(b), sb, f"batch {b}")
            rt = raw_tokens_batch(b)
            expect = {"input_ids": sb.model_inputs["input_ids"], "attention_mask": sb.model_inputs["attention_mask"],
                      "labels": sb.labels, "kd_batch": sb.kd.batch, "kd_pos": sb.kd.pos, "kd_ids": sb.kd.ids,
                      "kd_logprobs": sb.kd.logprobs}
            assert_same(rt, expect, f"batch {b} (tokens)")
        seq_tokens = sum(int(sb.model_inputs["attention_mask"].sum()) for sb in store_batches)
        del store_batches
        print(f"raw batches equal the store's ({len(batches)} batches checked)", flush=True)

        def make(where=store, **kw) -> StoreDataset:
            return StoreDataset(where, processor, batch_size=args.batch_size, seed=0, with_saliency=False, **kw)

        # The compact store's batches: the same ids where it kept them, log-probs within the codec's step.
        step = CodecConfig().logprob_step
        for a, b in zip(make(), make(compact_store)):
            assert a.sample_ids == b.sample_ids
            for g in ("kd", "iva", "tpa"):
                ga, gb = getattr(a, g), getattr(b, g)
                kept = gb.ids >= 0
                assert torch.equal(ga.ids[kept], gb.ids[kept]), g
                diff = (ga.logprobs[kept] - gb.logprobs[kept]).abs()
                assert not len(diff) or float(diff.max()) <= step + 1e-5, g
        compact_bytes = sum(f.stat().st_size for f in compact_store.rglob("*") if f.is_file())
        print(f"compact batches match the exact store's; compact store {compact_bytes / 1e6:.2f} MB on disk", flush=True)

        def take_epoch(stream, what: str) -> None:
            n = sum(len(next(stream).sample_ids) for _ in range(len(batches)))
            if n != n_samples:
                raise AssertionError(f"{what}: one epoch of batches gave {n} samples, expected {n_samples}")

        # store w0: one DataLoader over the repeating dataset, as distill.batch_stream runs it; the
        # dataset keeps its reader, decoded chunks and preprocessed images from epoch to epoch.
        w0_stream = iter(DataLoader(make(repeat=True), batch_size=None, num_workers=0))
        compact_w0_stream = iter(DataLoader(make(compact_store, repeat=True), batch_size=None, num_workers=0))
        compact_cold = make(compact_store, image_cache_mb=0, read_cache_mb=0)
        cold = make(image_cache_mb=0, read_cache_mb=0)  # every pass: zarr reads, image read + preprocess
        pixels = make(image_cache_mb=0, read_cache_mb=0, pixel_cache_dir=work / "pixels")  # zarr reads, pixel files
        old = make(encoding="processor", image_cache_mb=0, read_cache_mb=0)  # chat template + tokenizer too
        fresh_w2 = make()  # never iterated here: forked workers start with empty caches

        def loader_pass(dataset: StoreDataset, workers: int):
            def run(_u: int) -> None:
                loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
                n = sum(len(b.sample_ids) for b in loader)
                if n != n_samples:
                    raise AssertionError(f"store pass with {workers} workers gave {n} samples, expected {n_samples}")

            return run

        loader_pass(pixels, 0)(0)  # the first epoch writes the pixel cache
        pixel_entries, pixel_bytes, pixel_segments = PixelCache(work / "pixels", processor).stats()
        print(f"pixel cache: {pixel_entries} images, {pixel_bytes / 1e6:.2f} MB in {pixel_segments} segment(s)", flush=True)

        blocks = epoch_order(0, 0, shard_sizes, ds.block_size)

        def read_blocks_of(where):
            def run(_u: int) -> None:
                r = StoreReader(where)  # a new reader without a cache: every block read goes to zarr
                for shard, start, stop in blocks:
                    r.read_block(shard, start, stop)

            return run

        read_blocks = read_blocks_of(store)

        open_reader = StoreReader(store, cache_bytes=ds.read_cache_bytes)
        open_reader.sample_ids()  # opens every shard's index

        def read_blocks_warm(_u: int) -> None:
            for shard, start, stop in blocks:
                open_reader.read_block(shard, start, stop)

        def raw_pass(build):
            def run(_u: int) -> None:
                for b in range(len(batches)):
                    build(b)

            return run

        modes = {
            "store w0": lambda _u: take_epoch(w0_stream, "store w0"),
            "compact w0": lambda _u: take_epoch(compact_w0_stream, "compact w0"),
            "store w0 cold": loader_pass(cold, 0),
            "compact w0 cold": loader_pass(compact_cold, 0),
            "store w0 pixels": loader_pass(pixels, 0),
            "store w0 old": loader_pass(old, 0),
            "store w2 fresh": loader_pass(fresh_w2, 2),
            "read_block": read_blocks,
            "compact read_block": read_blocks_of(compact_store),
            "read_block warm": read_blocks_warm,
            "raw full": raw_pass(raw_full_batch),
            "raw tokens": raw_pass(raw_tokens_batch),
        }
        if args.codec_only:
            modes = {m: f for m, f in modes.items() if m in CODEC_PAIRS or m in CODEC_PAIRS.values() or m.startswith("raw")}
        print(f"timing {args.reps} epochs of {list(modes)} ({n_samples} samples, {len(batches)} batches), interleaved", flush=True)
        load_before = load_average()
        times = {m: round_sums(t) for m, t in interleaved(modes, args.reps, "cpu").items()}
        load_after = load_average()
        codec = codec_ratios(times, n_samples)
        if args.codec_only:
            path = write_results("loader_codec", {"env": environment(args.device, args.dtype), "args": vars(args),
                                                  "samples": n_samples, "store_bytes": store_bytes,
                                                  "compact_store_bytes": compact_bytes, **codec}, args.out)
            print(f"results: {path}")
            return

        # store w2: one DataLoader for the whole run, 2 persistent workers, drained back to back.
        # Not interleaved: its workers prefetch ahead, so they would run during the other modes.
        w2_stream = iter(DataLoader(make(repeat=True), batch_size=None, num_workers=2, prefetch_factor=4))
        take_epoch(w2_stream, "store w2")  # worker start-up and the first (cold) epoch
        w2_times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            take_epoch(w2_stream, "store w2")
            w2_times.append(time.perf_counter() - t0)
        del w2_stream
        load_w2 = load_average()

        # Instrumented passes: where a store w0 epoch goes, warm (steady state) and cold.
        phase_targets = {
            "read_block (zarr + index)": (StoreReader, "read_block"),
            "  array rows (zarr or chunk cache)": (StoreReader, "_rows"),
            "  index rows (Parquet -> dicts)": (_ShardIndex, "meta_rows"),
            "unpack": (dataset_module, "unpack"),
            "student encoding (all)": (StudentEncoder, "__call__"),
            "  image read + decode + sha256": (Record, "load"),
            "  image preprocess (processor)": (StudentEncoder, "_preprocess"),
            "  pixel cache read (disk)": (PixelCache, "get"),
            "  processor re-encode (encode)": (reencode_module, "encode"),
            "remap": (dataset_module, "remap"),
            "collate": (dataset_module, "collate"),
        }
        top = ["read_block (zarr + index)", "unpack", "student encoding (all)", "remap", "collate"]

        def instrumented(run) -> dict:
            per_pass = []
            for _ in range(args.reps):
                calls = {name: [] for name in phase_targets}
                with ExitStack() as stack:
                    for name, (owner, attr) in phase_targets.items():
                        stack.enter_context(clocked(owner, attr, calls[name]))
                    t0 = time.perf_counter()
                    run(0)
                    total = time.perf_counter() - t0
                p = {name: sum(c) for name, c in calls.items()}
                p["  student encoding, rest (ids, labels, positions)"] = p["student encoding (all)"] - sum(
                    p[n] for n in ("  image read + decode + sha256", "  image preprocess (processor)",
                                   "  pixel cache read (disk)", "  processor re-encode (encode)"))
                p["other (order, dataset, loop)"] = total - sum(p[n] for n in top)
                p["total"] = total
                per_pass.append(p)
            return {"median": {n: statistics.median(p[n] for p in per_pass) for n in per_pass[0]}, "passes": per_pass}

        phases = {"warm": instrumented(modes["store w0"]), "cold": instrumented(modes["store w0 cold"]),
                  "pixels": instrumented(modes["store w0 pixels"])}

    print(f"\ncompact store {compact_bytes / 1e6:.2f} MB vs exact {store_bytes / 1e6:.2f} MB")
    per_s = {m: stats([n_samples / t for t in ts]) for m, ts in times.items()}
    ratios = {m: per_rep_ratio(times["raw full"], times[m]) for m in modes}  # throughput / raw full
    ratios_tok = {m: per_rep_ratio(times["raw tokens"], times[m]) for m in modes}
    raw_full_median = statistics.median(times["raw full"])
    w2_ratio = stats([raw_full_median / t for t in w2_times])
    w2_ratio_tok = stats([statistics.median(times["raw tokens"]) / t for t in w2_times])
    labels = {
        "store w0": "store, num_workers=0, one loader (steady state)",
        "store w0 cold": "store, num_workers=0, caches off",
        "store w0 pixels": "store, num_workers=0, RAM caches off, pixel cache dir warm",
        "store w0 old": "store, num_workers=0, processor re-encode, caches off",
        "store w2 fresh": "store, num_workers=2, fresh loader per epoch",
        "read_block": "store, read_block alone (new reader, no cache)",
        "read_block warm": "store, read_block alone (open reader, cache)",
        "raw full": "raw memmap, all batch arrays + collate",
        "raw tokens": "raw memmap, tokens + response top-k",
    }
    print()
    print(
        f"{n_samples} samples ({seq_tokens / n_samples:.0f} tokens/sample), batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}; store {store_bytes / 1e6:.2f} MB on disk, raw full "
        f"{raw_bytes / 1e6:.2f} MB (tokens + response top-k {raw_min_bytes / 1e6:.2f} MB); median [min..max] of "
        f"{args.reps} epochs; load average {load_before[0]:.2f} -> {load_after[0]:.2f} (-> {load_w2[0]:.2f} after store w2)"
    )
    rows = [[labels[m], fmt_spread(stats(times[m])), fmt_spread(per_s[m], 1), fmt_spread(ratios[m]),
             fmt_spread(ratios_tok[m])] for m in modes]
    rows.append(["store, num_workers=2, one loader (steady state)*", fmt_spread(stats(w2_times)),
                 fmt_spread(stats([n_samples / t for t in w2_times]), 1), fmt_spread(w2_ratio), fmt_spread(w2_ratio_tok)])
    print(table(["mode", "s/epoch", "samples/s", "/ raw full", "/ raw tokens"], rows))
    print("* timed after the interleaved rounds (its workers prefetch, so it cannot alternate with the others): "
          "consecutive epochs against the median raw epoch")
    for m, r, rt in (("store w0", ratios["store w0"]["median"], ratios_tok["store w0"]["median"]),
                     ("store w2", w2_ratio["median"], w2_ratio_tok["median"])):
        print(f"{m} / raw: {r:.3f} (full), {rt:.3f} (tokens + response top-k): "
              f"{'meets' if r >= TARGET else 'MISSES'} / {'meets' if rt >= TARGET else 'MISSES'} the >= {TARGET} target")
    medians = {k: v["median"] for k, v in phases.items()}
    print(f"\nwhere a store w0 epoch goes (medians of {args.reps} instrumented passes; warm: steady state of one "
          "loader, cold: caches off, pixels: RAM caches off, pixel cache dir warm):")
    print(table(["phase"] + [f"{k} {c}" for k in medians for c in ("s", "share", "ms/sample")],
                [[n] + [x for m in medians.values() for x in (f"{m[n]:.4f}", f"{m[n] / m['total']:.1%}",
                                                              f"{1000 * m[n] / n_samples:.3f}")]
                 for n in medians["warm"]]))

    path = write_results(
        "loader",
        {
            "env": environment(args.device, args.dtype),
            "args": vars(args),
            "dump_spec": spec_dict(DUMP_SPEC),
            "samples": n_samples,
            "batches": len(batches),
            "sequence_tokens": seq_tokens,
            "store_bytes": store_bytes,
            "compact_store_bytes": compact_bytes,
            **codec,
            "raw_bytes": raw_bytes,
            "raw_tokens_bytes": raw_min_bytes,
            "pixel_cache": {"images": pixel_entries, "bytes": pixel_bytes, "segments": pixel_segments},
            "seconds_per_epoch": {m: stats(t) for m, t in times.items()},
            "samples_per_s": per_s,
            "throughput_over_raw_full": ratios,
            "throughput_over_raw_tokens": ratios_tok,
            "store_w2_one_loader_seconds_per_epoch": stats(w2_times),
            "store_w2_one_loader_over_raw_full": w2_ratio,
            "store_w2_one_loader_over_raw_tokens": w2_ratio_tok,
            "target_store_over_raw": TARGET,
            "store_w0_phases_s": {k: v["median"] for k, v in phases.items()},
            "store_w0_phases_s_per_pass": {k: v["passes"] for k, v in phases.items()},
            "load_average_before_after_timing": [load_before, load_after],
            "load_average_after_store_w2": load_w2,
        },
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()

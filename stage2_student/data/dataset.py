"""The Stage 2 dataset: store + images -> student batches.

:class:`StoreDataset` reads blocks of consecutive samples (one read per array, through the
reader's cache of decoded chunks), builds each sample's student encoding from the teacher's
stored ids (``stage2_student.data.reencode``: only the image blocks are re-expanded, images are
preprocessed once per process), remaps (``stage2_student.data.remap``), and yields
:class:`StudentBatch` es (``stage2_student.data.batch``) whose flat target rows are ready for
``stage2_student.losses``, in the order of the [order note] (``stage2_student.data.order``).
"""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import EncodedSample, ImagePolicy, Record, read_records
from schemas import StoredSample, StoreReader
from schemas.signals import SampleSignals, unpack
from pipeline.modeling.batching import pad_token_id
from schemas.compat import check_ids_in_vocab, open_store
from stage2_student.data.batch import collate, packed
from stage2_student.data.order import _check_order_args, _EpochPlan, batches_per_epoch
from stage2_student.data.pixel_cache import PixelCache
from stage2_student.data.reencode import ENCODING_MODES, EncodingMode, StudentDataError, StudentEncoder
from stage2_student.data.remap import StudentTargets, remap


def _max_stored_id(s: SampleSignals) -> int:
    arrays = [s.resp_ids, s.vis_ids, s.sample_ids, s.vis_sample_ids, s.tpa_cand, s.tpa_ids, s.tpa_sample_ids]
    return max((int(a.max()) for a in arrays if a is not None and a.size), default=-1)


class StoreDataset(IterableDataset):
    """Student batches from a teacher store and the images it was dumped from ([order note]).

    Iterating yields this rank's batches of one epoch from a resume point on: ``ds.start =
    (epoch, b)`` skips the first ``b`` batches this rank yields in that epoch (so a trainer's own
    count of batches done is the resume state); :meth:`set_epoch` is ``start = (epoch, 0)``. With
    ``repeat``, iteration goes on into the next epochs, endlessly, so one DataLoader (and its worker
    processes, with their caches) serves a whole run. Use with ``DataLoader(ds, batch_size=None,
    num_workers=N)``: workers split the batches, none is duplicated, and the yield order does not
    depend on N. ``batches_this_rank`` batches per epoch; ``batch.position`` is (epoch, global index).

    Each sample's student encoding is built from the teacher's stored token ids with the visual
    blocks re-expanded for the student (``stage2_student.data.reencode``, [fast path note]); images are
    preprocessed once per process and kept in a bounded cache, and decoded store chunks are kept in
    the reader's bounded cache (``schemas.reader.StoreReader``). Both caches are per process: with N
    DataLoader workers the memory bound is N times the sizes below. With ``pixel_cache_dir``,
    preprocessed images are also kept on disk, shared by every process and run with the same
    processor settings (``stage2_student.data.pixel_cache``), so an epoch after the first reads no image
    file even when the RAM caches cannot hold the data.

    Args:
        store_dir: the teacher store.
        processor: the student's processor (``open_store`` checks that the store serves it).
        batch_size: samples per batch.
        seed: data-order seed.
        start: (epoch, batches of that epoch this rank has already yielded); (0, 0) for a fresh run.
        data_path, image_root, split: the records and images; default: the manifest's dataset
            entry (with its ``limit``). Records are matched to stored samples by id.
        max_length: longest student sequence; default: the manifest's ``dataset.max_length``.
        temperature: the training temperature, refused if it is not the dump temperature.
        vocab_size: ids must be below this; default ``len(processor.tokenizer)`` (real tokens only).
        block_size, window_blocks: see [order note].
        length_group: sort runs of this many batches by teacher sequence length, longest first, so
            that a batch pads less ([order note]); 0 or 1: off.
        drop_last: drop the last, short batch of an epoch.
        rank, world_size: this process's share under DDP (global batch i goes to rank i % world_size;
            ranks get equal counts only when world_size divides ``n_batches``, or with ``pad_ranks``).
        pad_ranks: every rank yields ceil(n_batches / world_size) batches per epoch, so that ranks
            stay in step (one DDP step takes one batch from each) into the next epoch: a rank's
            batch past the epoch's last is a *filler*, a copy of the epoch's last batch with
            ``batch.filler`` True, which a trainer weighs 0 ([order note]).
        verify_checksums: check every file's size and sha256 before reading.
        with_saliency: also yield the saliency rows (the optional attention variant of IVA).
        repeat: go on with the next epoch after the last batch of one, without end.
        encoding: ``auto`` (the store fast path where the processor allows it, else the processor),
            ``processor`` (re-encode every sample with the chat template, tokenizer and processor),
            ``check`` (both, refusing any difference); see ``stage2_student.data.reencode``.
        image_cache_mb: per-process bound of the cache of preprocessed images (by image sha256).
        read_cache_mb: per-process bound of the cache of decoded store chunks.
        pixel_cache_dir: root of the on-disk cache of preprocessed images (None: none).
        pixel_cache_max_gb: bound of this processor's pixel cache directory (None: no bound).
        reader: the store already opened by ``open_store(store_dir, processor, temperature, ...)``,
            which made every refusal (then ``verify_checksums`` and ``read_cache_mb`` were its
            business); None: open it here, the same way.
    """

    def __init__(
        self,
        store_dir: str | Path,
        processor,
        batch_size: int,
        seed: int = 0,
        start: tuple[int, int] = (0, 0),
        data_path: str | Path | None = None,
        image_root: str | Path | None = None,
        split: str | None = None,
        max_length: int | None = None,
        temperature: float | None = None,
        vocab_size: int | None = None,
        block_size: int = 64,
        window_blocks: int = 8,
        length_group: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_ranks: bool = False,
        verify_checksums: bool = False,
        with_saliency: bool = True,
        repeat: bool = False,
        encoding: EncodingMode = "auto",
        image_cache_mb: float = 256,
        read_cache_mb: float = 128,
        pixel_cache_dir: str | Path | None = None,
        pixel_cache_max_gb: float | None = None,
        reader: StoreReader | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if encoding not in ENCODING_MODES:
            raise ValueError(f"encoding must be one of {ENCODING_MODES}, got {encoding!r}")
        if image_cache_mb < 0 or read_cache_mb < 0:
            raise ValueError(f"cache sizes must be >= 0 MB, got image_cache_mb={image_cache_mb}, read_cache_mb={read_cache_mb}")
        self.store_dir = Path(store_dir)
        self.read_cache_bytes = int(read_cache_mb * 2**20)
        if reader is None:
            reader = open_store(self.store_dir, processor, temperature, verify_checksums, self.read_cache_bytes)
        self.manifest = reader.manifest
        self.processor = processor
        tok = processor.tokenizer
        self.pad_id = pad_token_id(tok)
        self.vocab_size = len(tok) if vocab_size is None else int(vocab_size)
        self.max_length = self.manifest.max_length if max_length is None else int(max_length)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.block_size, self.window_blocks = block_size, window_blocks
        self.rank, self.world_size, self.with_saliency = rank, world_size, with_saliency
        self.repeat = repeat
        self.shard_sizes = reader.shard_sizes()
        self.n_batches = batches_per_epoch(self.shard_sizes, batch_size, drop_last)  # global, all ranks
        # with pad_ranks, rank r's batches are r, r + W, ... below the next multiple of W (fillers past n_batches)
        self._rank_end = -(-self.n_batches // world_size) * world_size if pad_ranks else self.n_batches
        self.batches_this_rank = len(range(rank, self._rank_end, world_size))
        _check_order_args(seed, 0, self.shard_sizes, block_size)  # now rather than in a worker
        if window_blocks < 1:
            raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
        if length_group < 0:
            raise ValueError(f"length_group must be >= 0 batches, got {length_group}")
        self.group = batch_size * length_group if length_group > 1 else 0
        self.lengths = reader.index_column("length") if self.group else None
        self.start = start
        self.records = self._read_records(reader, data_path, image_root, split)
        pixels = None
        if pixel_cache_dir is not None:
            max_bytes = None if pixel_cache_max_gb is None else int(pixel_cache_max_gb * 2**30)
            pixels = PixelCache(pixel_cache_dir, processor, max_bytes)
        self.encoder = StudentEncoder(processor, self.max_length, encoding, int(image_cache_mb * 2**20), self.data_path,
                                      pixel_cache=pixels)
        self._reader, self._reader_pid = reader, os.getpid()
        self._ids_checked: set[str] = set()  # samples whose stored ids were checked against the vocabulary

    def __getstate__(self) -> dict:
        # Pickled for a spawned worker: zarr handles stay behind (each process opens its own).
        state = dict(self.__dict__)
        state["_reader"], state["_reader_pid"] = None, None
        return state

    def _store_reader(self) -> StoreReader:
        """This process's reader: zarr handles are never shared across processes (a forked worker
        opens its own; the encoder and its image cache are plain objects and are inherited)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = StoreReader(self.store_dir, cache_bytes=self.read_cache_bytes)
            self._reader_pid = os.getpid()
        return self._reader

    def _read_records(self, reader: StoreReader, data_path, image_root, split) -> dict[str, Record]:
        dataset = self.manifest.dataset
        if data_path is None:
            data_path, limit = self.manifest.value("dataset", "path"), dataset.get("limit")
            image_root = dataset.get("image_root") if image_root is None else image_root
        else:
            limit = None
        split = dataset.get("split", "train") if split is None else split
        wanted = set(reader.sample_ids())
        records = {}
        # The images are read under the policy the store was dumped with (its samples passed it).
        policy = ImagePolicy.from_settings(dataset)
        for rec in islice(read_records(data_path, image_root, split, policy), limit):
            if isinstance(rec, Record) and rec.sample_id in wanted:
                records[rec.sample_id] = rec
        missing = sorted(wanted - set(records))
        if missing:
            raise StudentDataError(
                f"{len(missing)} stored sample(s) have no usable record in {data_path}, e.g. sample "
                f"{missing[0]!r}; the data is not the one the store {self.store_dir} was dumped from"
            )
        self.data_path = Path(data_path)
        return records

    @property
    def start(self) -> tuple[int, int]:
        """(epoch, batches of it already yielded by this rank): where the next iteration starts."""
        return self.epoch, self.start_batch

    @start.setter
    def start(self, value: tuple[int, int]) -> None:
        epoch, batch = (int(v) for v in value)
        if epoch < 0 or not 0 <= batch <= self.batches_this_rank:
            raise ValueError(f"start (epoch, batch) = ({epoch}, {batch}) out of range: an epoch has "
                             f"{self.batches_this_rank} batches for rank {self.rank}")
        self.epoch, self.start_batch = epoch, batch

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch ``epoch`` from its first batch next time."""
        self.start = (epoch, 0)

    def batch_indices(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Global batch indices of the start epoch that this rank's worker yields, in order ([order note])."""
        return [i for epoch, i in self._worker_batches(worker, num_workers, repeat=False)]

    def _worker_batches(self, worker: int, num_workers: int, repeat: bool):
        """(epoch, global batch index) that this rank's worker yields, in order: this rank's batches
        from ``start`` on (to the end of that epoch, or on through the next epochs with ``repeat``)
        form one stream, dealt round-robin to the workers from worker 0 on, as the DataLoader
        collects them."""
        mine = range(self.rank, self._rank_end, self.world_size)
        epoch, first, dealt = self.epoch, self.start_batch, 0
        while True:
            remaining = mine[first:]
            for i in remaining[(worker - dealt) % num_workers :: num_workers]:
                yield epoch, i
            if not repeat or not mine:
                return
            dealt += len(remaining)
            epoch, first = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = self._store_reader()
        plan = None
        blocks: dict[int, list[StoredSample]] = {}
        for epoch, i in self._worker_batches(worker, num_workers, self.repeat):
            if plan is None or plan.epoch != epoch:
                plan = _EpochPlan(self.seed, epoch, self.shard_sizes, self.block_size, self.window_blocks,
                                  self.lengths, self.group)
                n_samples = int(plan.window_start[-1])
                blocks = {}
            filler = i >= self.n_batches
            last = min(i, self.n_batches - 1)  # a filler reads the epoch's last batch
            items = plan.samples(last * self.batch_size, min((last + 1) * self.batch_size, n_samples))
            # Batches only move forward through the windows: blocks of earlier windows are done.
            window = min(block for block, _, _ in items) // self.window_blocks
            blocks = {k: v for k, v in blocks.items() if k // self.window_blocks >= window}
            encoded, targets = [], []
            for block, shard, idx in items:
                if block not in blocks:
                    _, start, stop = plan.blocks[block]
                    blocks[block] = reader.read_block(shard, start, stop)
                stored = blocks[block][idx - plan.blocks[block][1]]
                enc, tg = self.encode_and_remap(stored)
                encoded.append(enc)
                targets.append(tg)
            batch = collate(encoded, targets, self.pad_id, position=(epoch, i), with_saliency=self.with_saliency)
            batch.filler = filler
            yield batch if info is None else packed(batch)

    def encode_and_remap(self, stored: StoredSample) -> tuple[EncodedSample, StudentTargets]:
        """The student's encoding of one stored sample (``self.encoder``) and its remapped signals."""
        teacher = unpack(stored)
        sid = teacher.sample_id
        if sid not in self._ids_checked:  # the store does not change: once per sample and process
            check_ids_in_vocab(_max_stored_id(teacher), self.vocab_size, where=f"sample {sid!r} of the store")
            self._ids_checked.add(sid)
        enc = self.encoder(teacher, self.records[sid])
        return enc, remap(teacher, enc)

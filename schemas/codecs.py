"""How arrays are stored: codecs that turn a sample's decoded arrays into the arrays on disk and back.

A codec takes one or more *decoded* arrays (what every reader sees: ``resp_ids`` [R, k] int32,
``resp_logprobs`` [R, k] float32, ...) and stores them as other flat arrays (its *stored* arrays),
one sample at a time, so the store's layout (flat rows, per-sample offsets in the Parquet index,
Zarr chunks with zstd and a CRC32C, sha256 per file) is unchanged. ``ShardWriter`` encodes,
``StoreReader`` decodes; the codecs are recorded in ``shard.json`` and the manifest (``codecs``).
An array without a codec is stored as it is (the ``exact`` format, and every store written before
codecs existed). A codec name this version does not know is refused, naming it.

:class:`TopkCodec` (``topk-packed-v1``) stores a sparse distribution (ids + exact log-probs per row):

one uint8 array ``<prefix>``, each sample's rows as one run of bytes (its offsets in the index):

* the row count R (uint32, little-endian)
* R bytes: how many ids each row keeps (its most probable ones)
* R float32: the exact mass outside the kept ids, ``1 - Σ_kept p`` computed in float64 from the
  exact log-probs (stored, never derived from rounded values), byte plane by byte plane
* one byte per kept id after a row's first: its log-prob relative to the row's first, quantised,
  ``level = round((lp_1 - lp_i) / step)`` capped at 255, stored as the increase over the previous
  id's level (small numbers, which zstd codes in a few bits)
* the kept ids in rank order, bit-packed at ``ceil(log2 vocab_size)`` bits each (padded to a byte)

One array per signal (not one per part) keeps the shard's file count and index columns low.

Decoding gives the kept ids in rank order, then -1 (log-prob -inf) up to k. The log-probs are
``log(exp(-level * step) * (1 - tail) / Σ_row exp(-level * step))``: the decoded ids carry exactly
the stored ``1 - tail``, so the tail bucket that Stage 2 derives from the decoded log-probs
(``pipeline.modeling.sparse.tail_logprob``) is the stored tail (to float32 rounding), whatever the
quantisation did. A decoded log-prob is within ``step`` of the exact one (levels under the cap).
Readers decode a block of samples at once (:meth:`TopkCodec.decode_many`): every sample's runs are
parsed and checked together, so decoding costs per byte, not per sample.

How many ids a row keeps: the fewest whose decoded row is within ``max_kl`` nats of the exact
top-k row, by :func:`completion_kl`, and, with ``max_dropped``, whose dropped ids carry at most
that much of the row's mass (each rule off at 0; both off: every valid id). The KL rule compares on
the exact row's k + 1 buckets, filling the ids a decoded row lacks by the maximum-entropy
completion (its tail spread evenly over the vocabulary's other tokens), so dropping an id is
charged for what the student can no longer learn about it, not hidden inside a coarser tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from schemas.errors import StoreFormatError
from schemas.layout import ArraySpec

CODECS_KEY = "codecs"  # the entry in shard.json and the manifest
PAD_ID = -1
LEVEL_CAP = 255  # uint8 levels
# Floor of a tail derived from decoded float32 log-probs: float32 eps, the losses' floor
# (``stage2_student.losses`` [tail floor note]).
DECODED_TAIL_FLOOR = float(np.finfo(np.float32).eps)


class CodecError(ValueError):
    """Stored arrays that a codec cannot decode (the reader adds the store, shard and sample).
    ``sample``: in samples decoded together, the position of the first that does not decode."""

    def __init__(self, message: str, sample: int | None = None) -> None:
        super().__init__(message)
        self.sample = sample


# -- bit packing ---------------------------------------------------------------------------------


def id_bits(vocab_size: int) -> int:
    """Bits per id for ids in [0, vocab_size): ceil(log2 vocab_size), at least 1."""
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative ints, ``width`` bits each, little-endian, into uint8 (the last byte zero-padded)."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


# Widest id the readers unpack: an id starting at any bit of a byte fits in one uint64 word.
MAX_ID_BITS = 57


def unpack_runs(buf: np.ndarray, starts: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """Runs of ids packed by :func:`pack_bits`: ``counts[j]`` ids of ``width`` bits from byte
    ``starts[j]`` of ``buf``, every run read together (int64, run after run). Each id is cut from
    the up to 8 bytes that hold its bits, so the cost is a few numpy calls whatever the number of
    runs. ``buf`` must hold 8 bytes past the last packed byte (their values do not matter)."""
    if not 1 <= width <= MAX_ID_BITS:
        raise ValueError(f"ids of {width} bits: only 1..{MAX_ID_BITS} are supported")
    counts = np.asarray(counts, dtype=np.int64)
    run = np.repeat(np.arange(len(counts)), counts)
    local = np.arange(len(run), dtype=np.int64) - (np.cumsum(counts) - counts)[run]
    bit = 8 * np.asarray(starts, dtype=np.int64)[run] + width * local
    byte = bit >> 3
    word = np.zeros(len(run), dtype=np.uint64)
    for b in range(-(-(width + 7) // 8)):
        word |= buf[byte + b].astype(np.uint64) << np.uint64(8 * b)
    return ((word >> (bit & 7).astype(np.uint64)) & np.uint64((1 << width) - 1)).astype(np.int64)


def unpack_bits(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``count`` ints (int64) of ``width`` bits."""
    need = -(-count * width // 8)
    if len(packed) != need:
        raise CodecError(f"{len(packed)} bytes for {count} ids of {width} bits (expected {need})")
    buf = np.concatenate([np.asarray(packed, dtype=np.uint8).reshape(-1), np.zeros(8, np.uint8)])
    return unpack_runs(buf, np.zeros(1, np.int64), np.array([count]), width)


def _runs(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Flat indices of the byte runs [starts[j], starts[j] + lens[j]), run after run (int64)."""
    lens = np.asarray(lens, dtype=np.int64)
    ends = np.cumsum(lens)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lens), lens) + np.arange(total, dtype=np.int64)


# -- fidelity ------------------------------------------------------------------------------------


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x * log(y) with 0 where x == 0 (whatever y)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


def _prefix_kl(p: np.ndarray, qt: np.ndarray, tail: np.ndarray, vocab_size: int) -> np.ndarray:
    """KL, for every prefix length n = 0..k, between an exact row and the row that keeps its first n
    ids with weights ``qt`` (rescaled to the kept exact mass), by the completion of :func:`completion_kl`.

    p [R, k] exact probs sorted descending (0 at padding); qt [R, k] unnormalised decoded weights
    (exp(-level*step)); tail [R] the exact mass outside all k. Returns [R, k + 1] (float64).
    """
    r, k = p.shape
    zeros = np.zeros((r, 1))
    cp = np.concatenate([zeros, np.cumsum(p, axis=1)], axis=1)  # P_n, kept exact mass
    cq = np.concatenate([zeros, np.cumsum(qt, axis=1)], axis=1)  # S_n
    # Σ_{i<=n} p_i log(p_i / q_i) with q_i = qt_i P_n / S_n:
    kept = np.concatenate([zeros, np.cumsum(_xlogy(p, p) - _xlogy(p, qt), axis=1)], axis=1)
    kept -= _xlogy(cp, cp) - _xlogy(cp, cq)
    # The dropped ids and the exact tail share m'_n = tail + (P_k - P_n) evenly over V - n tokens.
    m_n = tail[:, None] + (cp[:, -1:] - cp)
    others = np.maximum(vocab_size - np.arange(k + 1), 1)[None, :]
    plogp = np.concatenate([zeros, np.cumsum(_xlogy(p, p), axis=1)], axis=1)
    dropped = (plogp[:, -1:] - plogp) - _xlogy(cp[:, -1:] - cp, m_n / others)
    beyond = np.maximum(vocab_size - (p > 0).sum(axis=1), 1)[:, None]  # tokens in the exact tail bucket
    tail_term = _xlogy(tail[:, None], tail[:, None]) - _xlogy(tail[:, None], m_n * beyond / others)
    return np.maximum(kept + dropped + tail_term, 0.0)


def completion_kl(exact_ids: np.ndarray, exact_logprobs: np.ndarray, decoded_ids: np.ndarray,
                  decoded_logprobs: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per row, KL(exact k + 1 buckets ‖ decoded) in nats, float64 [R].

    The exact row's buckets are its valid ids and its tail ``1 - Σ p``. The decoded row is read as a
    distribution over the whole vocabulary: its ids with their probabilities, and its tail (``1 -``
    the decoded ids' mass, floored at float32 eps as the losses floor it) spread evenly over the
    ``vocab_size - n`` tokens it does not name; that is then summed onto the exact buckets. Equal rows give 0; a row that keeps fewer ids pays for the
    mass it stopped naming. Both inputs: ids [R, k] (-1 padding), log-probs [R, k] (-inf or any value
    at padding).
    """
    e_ids, d_ids = np.asarray(exact_ids, np.int64), np.asarray(decoded_ids, np.int64)
    p = np.where(e_ids >= 0, np.exp(np.asarray(exact_logprobs, np.float64)), 0.0)
    q = np.where(d_ids >= 0, np.exp(np.asarray(decoded_logprobs, np.float64)), 0.0)
    m = np.maximum(1.0 - p.sum(axis=1), 0.0)
    # The decoded tail as Stage 2 derives it from float32 log-probs, floored like the losses' (a row
    # whose ids carry all but ~1e-10 rounds to 0; the exact row's own tail of 1e-10 is no error).
    m_dec = np.maximum(1.0 - q.sum(axis=1), DECODED_TAIL_FLOOR)
    n_dec = (d_ids >= 0).sum(axis=1)
    k_exact = (e_ids >= 0).sum(axis=1)
    fill = m_dec / np.maximum(vocab_size - n_dec, 1)
    # q at each exact id: its decoded prob if the decoded row names it, else the fill.
    match = (e_ids[:, :, None] == d_ids[:, None, :]) & (e_ids[:, :, None] >= 0)
    q_at = np.where(match.any(axis=2), (match * q[:, None, :]).sum(axis=2), fill[:, None])
    # the exact tail's tokens: decoded ids outside the exact row, and the fill on the rest
    named_outside = np.where((d_ids >= 0) & ~(d_ids[:, :, None] == e_ids[:, None, :]).any(axis=2), q, 0.0)
    outside = (d_ids >= 0).sum(axis=1) - match.any(axis=1).sum(axis=1)
    q_tail = named_outside.sum(axis=1) + fill * np.maximum(vocab_size - k_exact - outside, 0)
    with np.errstate(divide="ignore"):
        kl = (_xlogy(p, p) - _xlogy(p, q_at)).sum(axis=1) + _xlogy(m, m) - _xlogy(m, q_tail)
    return np.maximum(kl, 0.0)


# -- the top-k codec -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TopkCodec:
    """One sparse distribution signal (ids + log-probs, k per row) stored compactly; see the module
    docstring. ``prefix`` names the stored arrays; ``ids``/``logprobs`` the decoded ones."""

    NAME = "topk-packed-v1"

    ids: str
    logprobs: str
    prefix: str
    k: int
    vocab_size: int
    step: float = 1.0 / 16
    max_kl: float = 0.0
    max_dropped: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 255:
            raise ValueError(f"{self.NAME}: k must be in [1, 255], got {self.k}")
        if not 1 <= self.vocab_size <= 2**31:  # decoded ids are int32
            raise ValueError(f"{self.NAME}: vocab_size must be in [1, 2**31], got {self.vocab_size}")
        if not self.step > 0:
            raise ValueError(f"{self.NAME}: step must be > 0, got {self.step}")
        if not self.max_kl >= 0:
            raise ValueError(f"{self.NAME}: max_kl must be >= 0, got {self.max_kl}")
        if not 0 <= self.max_dropped < 1:
            raise ValueError(f"{self.NAME}: max_dropped must be in [0, 1), got {self.max_dropped}")

    # names and specs

    @cached_property
    def decoded(self) -> dict[str, ArraySpec]:
        return {self.ids: ArraySpec("int32", (self.k,)), self.logprobs: ArraySpec("float32", (self.k,))}

    @cached_property
    def stored(self) -> dict[str, ArraySpec]:
        return {self.prefix: ArraySpec("uint8")}

    @property
    def logprob_error(self) -> float:
        """Bound of |decoded - exact| log-prob of a kept id whose level is under the cap."""
        return self.step

    def to_json(self) -> dict:
        return {"codec": self.NAME, "arrays": [self.ids, self.logprobs], "prefix": self.prefix,
                "params": {"k": self.k, "vocab_size": self.vocab_size, "step": self.step, "max_kl": self.max_kl,
                           "max_dropped": self.max_dropped}}

    @classmethod
    def from_json(cls, d: dict) -> "TopkCodec":
        ids, logprobs = d["arrays"]
        return cls(ids=ids, logprobs=logprobs, prefix=d["prefix"], **d["params"])

    # encoding

    def _levels(self, lp_sorted: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Quantised levels (int64 [R, k]) of rows sorted descending: 0 for the first, capped."""
        with np.errstate(invalid="ignore"):  # -inf - -inf in an all-padding row, masked
            rel = np.where(valid, lp_sorted[:, :1] - lp_sorted, 0.0)
        return np.minimum(np.rint(rel / self.step), LEVEL_CAP).astype(np.int64)

    def encode(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One sample's decoded arrays -> its stored arrays."""
        ids = np.asarray(arrays[self.ids], dtype=np.int64)
        lp = np.asarray(arrays[self.logprobs], dtype=np.float64)
        valid = ids >= 0
        if valid.any() and (ids[valid] >= self.vocab_size).any():
            raise ValueError(f"array {self.ids!r}: id {int(ids[valid].max())} is outside the vocabulary "
                             f"[0, {self.vocab_size}) of codec {self.NAME}")
        lp = np.where(valid, lp, -np.inf)
        order = np.argsort(-lp, axis=1, kind="stable")  # valid ids first, most probable first
        ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
        valid = ids >= 0
        p = np.where(valid, np.exp(lp), 0.0)
        tail = np.maximum(1.0 - p.sum(axis=1), 0.0)
        levels = self._levels(lp, valid)
        n = self._kept(p, levels, valid, tail)
        keep = np.arange(self.k)[None, :] < n[:, None]
        kept_tail = tail + np.where(keep, 0.0, p).sum(axis=1)  # exact mass outside the kept ids
        tail32 = kept_tail.astype(np.float32)
        # float32 rounding must leave the kept ids some mass (a row whose kept mass is below 6e-8).
        tail32 = np.where((n > 0) & (tail32 >= 1.0), np.nextafter(np.float32(1), np.float32(0)), tail32)
        deltas = np.diff(levels, axis=1)  # level_i - level_{i-1} for i >= 1, >= 0 (sorted, capped)
        parts = [
            np.array([len(n)], dtype="<u4").view(np.uint8),
            n.astype(np.uint8),
            _planes(tail32.astype("<f4")),
            deltas[keep[:, 1:]].astype(np.uint8),
            pack_bits(ids[keep], id_bits(self.vocab_size)),
        ]
        return {self.prefix: np.concatenate(parts)}

    def _kept(self, p: np.ndarray, levels: np.ndarray, valid: np.ndarray, tail: np.ndarray) -> np.ndarray:
        """Ids each row keeps (rows sorted descending): the fewest that meet every rule that is on
        (``max_kl``, ``max_dropped``); every valid id when neither is."""
        n_valid = valid.sum(axis=1)
        if not len(p) or (self.max_kl == 0 and self.max_dropped == 0):
            return n_valid
        prefix = np.arange(self.k + 1)[None, :] <= n_valid[:, None]
        n = np.zeros(len(p), dtype=np.int64)
        if self.max_kl > 0:
            kl = _prefix_kl(p, np.where(valid, np.exp(-levels * self.step), 0.0), tail, self.vocab_size)
            ok = (kl <= self.max_kl) & prefix
            n = np.maximum(n, np.where(ok.any(axis=1), ok.argmax(axis=1), n_valid))
        if self.max_dropped > 0:
            zeros = np.zeros((len(p), 1))
            dropped = p.sum(axis=1, keepdims=True) - np.concatenate([zeros, np.cumsum(p, axis=1)], axis=1)
            ok = (dropped <= self.max_dropped) & prefix
            n = np.maximum(n, np.where(ok.any(axis=1), ok.argmax(axis=1), n_valid))
        return n

    # decoding

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One sample's stored arrays -> its decoded arrays; :class:`CodecError` naming the stored
        array when its bytes do not decode."""
        return self.decode_many([stored[self.prefix]])[0]

    def decode_many(self, bufs: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Many samples' stored bytes (this codec's array, one run per sample) -> each sample's
        decoded arrays, decoded together: a fixed number of numpy calls, not a number per sample
        (a block of a store decodes at the speed of its bytes). :class:`CodecError` naming the
        stored array, with ``sample`` the position of the first sample that does not decode."""
        try:
            parts = self.parse_many(bufs)
        except CodecError as e:
            raise CodecError(f"array {self.prefix} ({self.NAME}): {e}", e.sample) from None
        n, levels = parts["n"], parts["levels"]
        row = np.repeat(np.arange(len(n)), n)  # each kept id's row
        mass = np.bincount(row, weights=self._weights[levels], minlength=len(n))  # Σ exp(-level * step)
        with np.errstate(divide="ignore"):
            log_scale = np.log((1.0 - parts["tail"].astype(np.float64)) / np.maximum(mass, 1e-300))
        keep = np.arange(self.k)[None, :] < n[:, None]
        ids = np.full((len(n), self.k), PAD_ID, dtype=np.int32)
        ids[keep] = parts["ids"]
        lp = np.full((len(n), self.k), -np.inf, dtype=np.float32)
        lp[keep] = log_scale[row] - levels * self.step
        cut = np.cumsum(parts["rows"])[:-1]
        return [{self.ids: i, self.logprobs: x} for i, x in zip(np.split(ids, cut), np.split(lp, cut))]

    def parse(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        """A sample's bytes -> ``n`` (ids kept per row), ``tail`` (float32 per row), and per kept id
        (flat, row after row, rank order) ``ids`` and ``levels``; :class:`CodecError` when they do
        not fit together."""
        parts = self.parse_many([buf])
        del parts["rows"]
        return parts

    def parse_many(self, bufs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Samples' bytes, parsed together -> ``rows`` (per sample), over the samples' rows in order
        ``n`` and ``tail``, and per kept id (row after row, rank order) ``ids`` and ``levels``.
        Every length and value is checked before it is used; :class:`CodecError` (``sample``: the
        first sample whose bytes do not fit together) otherwise. An empty run is a sample written
        without rows of this signal."""
        count = len(bufs)
        flat = [np.asarray(b, dtype=np.uint8).reshape(-1) for b in bufs]
        lens = np.array([len(b) for b in flat], dtype=np.int64)
        off = np.cumsum(lens) - lens
        buf = np.concatenate([*flat, np.zeros(8, np.uint8)])  # 8 spare bytes for unpack_runs

        def fail(bad: np.ndarray, message, owner: np.ndarray | None = None) -> None:
            """Refuse the first sample with a bad entry (``owner``: each entry's sample, when the
            entries are rows or ids; entries in sample order)."""
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                s = first if owner is None else int(owner[first])
                raise CodecError(message(s), s)

        has = lens > 0
        fail(has & (lens < 4), lambda s: f"{lens[s]} bytes, shorter than the row count")
        rows = np.zeros(count, dtype=np.int64)
        rows[has] = np.ascontiguousarray(buf[off[has][:, None] + np.arange(4)]).view("<u4").reshape(-1)
        fail(lens < 4 * has + 5 * rows, lambda s: f"{lens[s]} bytes for {rows[s]} rows (at least {4 + 5 * rows[s]})")
        n = buf[_runs(off + 4, rows)].astype(np.int64)
        sample = np.repeat(np.arange(count), rows)  # each row's sample
        per_sample = lambda x: np.bincount(sample, weights=x, minlength=count).astype(np.int64)  # noqa: E731
        fail(n > self.k, lambda s: f"a row keeps {int(n[sample == s].max())} ids, more than k = {self.k}", sample)
        # the tails, byte plane by byte plane: byte b of row r at tail start + b * rows + r
        first_row = np.cumsum(rows) - rows
        at = (off + 4 + rows)[sample] + np.arange(len(n)) - first_row[sample]
        tail = np.ascontiguousarray(buf[at[:, None] + np.arange(4) * rows[sample][:, None]]).view("<f4").reshape(-1)
        fail(~(np.isfinite(tail) & (tail >= 0) & (tail <= 1)), lambda s: "tail masses outside [0, 1]", sample)
        total = per_sample(n)
        n_codes = total - per_sample(n > 0)
        width = id_bits(self.vocab_size)
        expected = np.where(has, 4 + 5 * rows + n_codes + -(-total * width // 8), 0)
        fail(lens != expected,
             lambda s: f"{lens[s]} bytes, expected {expected[s]} for {rows[s]} rows keeping {total[s]} ids")
        codes_at = off + 4 + 5 * rows
        ids = unpack_runs(buf, codes_at + n_codes, total, width)
        id_sample = np.repeat(np.arange(count), total)
        fail(ids >= self.vocab_size,
             lambda s: f"id {int(ids[id_sample == s].max())} outside the vocabulary [0, {self.vocab_size})", id_sample)
        # A kept id's level: the sum of its row's codes up to it (a row's first id has none: level 0).
        firsts = (np.cumsum(n) - n)[n > 0]  # each non-empty row's first id, in the flat order
        delta = np.zeros(len(ids), dtype=np.int64)
        coded = np.ones(len(ids), dtype=bool)
        coded[firsts] = False
        delta[coded] = buf[_runs(codes_at, n_codes)]
        acc = np.cumsum(delta)
        levels = acc - np.repeat(acc[firsts], n[n > 0])
        fail(levels > LEVEL_CAP, lambda s: f"log-prob levels exceed {LEVEL_CAP}", id_sample)
        return {"rows": rows, "n": n, "tail": tail, "levels": levels, "ids": ids}

    @cached_property
    def _weights(self) -> np.ndarray:
        return np.exp(-np.arange(LEVEL_CAP + 1) * self.step)


def _planes(x: np.ndarray) -> np.ndarray:
    """The bytes of a fixed-width array, plane by plane (every value's first byte, then every second
    byte, ...): the exponent bytes of floats then sit together, which zstd compresses."""
    return np.ascontiguousarray(x.view(np.uint8).reshape(len(x), x.itemsize).T).reshape(-1)


# -- the codecs of a store -----------------------------------------------------------------------

KNOWN_CODECS = {TopkCodec.NAME: TopkCodec}


class StoreCodecs:
    """The codecs of one store: which decoded arrays each stores, and the translation of a sample's
    arrays between decoded and stored. No codecs: every array is stored as it is."""

    def __init__(self, codecs: list[TopkCodec] | tuple = ()) -> None:
        self.codecs = list(codecs)
        seen: dict[str, str] = {}
        for c in self.codecs:
            for name in [*c.decoded, *c.stored]:
                if name in seen:
                    raise ValueError(f"array {name!r} belongs to two codecs ({seen[name]} and {c.prefix})")
                seen[name] = c.prefix
        self._source = {s: next(iter(c.decoded)) for c in self.codecs for s in c.stored}
        self._by_decoded = {d: c for c in self.codecs for d in c.decoded}

    def __bool__(self) -> bool:
        return bool(self.codecs)

    @property
    def stored_names(self) -> set[str]:
        """The stored arrays that some codec decodes (empty: every array is stored as it is)."""
        return set(self._source)

    def stored_specs(self, decoded: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
        """The arrays on disk for these decoded arrays (refusing a codec whose arrays are not
        declared, or declared with another shape)."""
        out = dict(decoded)
        for c in self.codecs:
            for name, spec in c.decoded.items():
                if decoded.get(name) != spec:
                    raise ValueError(f"codec {c.NAME} ({c.prefix}) stores array {name!r} as {spec}, "
                                     f"but the store declares {decoded.get(name)}")
                del out[name]
            out |= c.stored
        return out

    def decoded_specs(self, stored: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
        """The arrays readers see, from the arrays on disk (the inverse of :meth:`stored_specs`)."""
        out = dict(stored)
        for c in self.codecs:
            missing = [n for n in c.stored if n not in stored]
            if missing:
                raise StoreFormatError(f"codec {c.NAME} ({c.prefix}): stored array(s) {missing} are not in the store")
            for n in c.stored:
                del out[n]
            out |= c.decoded
        return out

    def source_of(self, stored_name: str) -> str:
        """The decoded array a stored array holds (itself when it has no codec), for byte accounting."""
        return self._source.get(stored_name, stored_name)

    def codec_of(self, decoded_name: str) -> TopkCodec | None:
        return self._by_decoded.get(decoded_name)

    def logprob_error(self, decoded_name: str) -> float:
        """Bound of the decoding error of a log-prob array (0 when stored as it is)."""
        c = self._by_decoded.get(decoded_name)
        return 0.0 if c is None else c.logprob_error

    def encode(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A sample's decoded arrays -> its stored arrays (arrays without a codec pass through; a
        codec whose arrays the sample lacks is given zero rows)."""
        out = dict(arrays)
        for c in self.codecs:
            parts = {}
            for name, spec in c.decoded.items():
                parts[name] = out.pop(name, None)
                if parts[name] is None:
                    parts[name] = np.zeros((0, *spec.row_shape), dtype=spec.dtype)
            out |= c.encode(parts)
        return out

    def decode(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A sample's stored arrays -> its decoded arrays (:class:`CodecError` on what does not decode)."""
        if not self.codecs:
            return arrays
        out = dict(arrays)
        out |= self.decode_many({n: [out.pop(n)] for n in self.stored_names})[0]
        return out

    def decode_many(self, stored: dict[str, list[np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Every stored array of the codecs, one run per sample -> each sample's decoded arrays,
        each codec decoding all the samples together (:class:`CodecError`, with ``sample``, on what
        does not decode)."""
        count = len(next(iter(stored.values()))) if stored else 0
        out: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
        for c in self.codecs:
            for o, d in zip(out, c.decode_many(stored[c.prefix])):
                o |= d
        return out

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self.codecs]

    @classmethod
    def from_json(cls, doc, where: str = "store") -> "StoreCodecs":
        """From a ``codecs`` entry (None or absent: no codecs). Refuses a codec this version does not
        know, naming it."""
        if doc is None:
            return cls()
        if not isinstance(doc, list):
            raise StoreFormatError(f"{where}: '{CODECS_KEY}' must be a list, found {type(doc).__name__}")
        out = []
        for d in doc:
            name = d.get("codec") if isinstance(d, dict) else None
            if name not in KNOWN_CODECS:
                raise StoreFormatError(f"{where}: arrays {d.get('arrays') if isinstance(d, dict) else d!r} are stored "
                                       f"with codec {name!r}, which this version cannot decode "
                                       f"(known codecs: {', '.join(sorted(KNOWN_CODECS))})")
            try:
                out.append(KNOWN_CODECS[name].from_json(d))
            except (KeyError, TypeError, ValueError) as e:
                raise StoreFormatError(f"{where}: codec {name!r}: bad parameters {d!r}: {e}") from e
        try:
            return cls(out)
        except ValueError as e:
            raise StoreFormatError(f"{where}: {e}") from e

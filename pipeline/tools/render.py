"""Figures of a teacher store (``pipeline inspect STORE --out DIR``).

:func:`render` draws PNGs: saliency overlays on the dataset's images, the IRS-per-layer curve and
histograms of the response distributions' tail mass and entropy. :func:`overlay` blends one
saliency map over one image.
"""

from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.modeling.sparse import tail_mass
from pipeline.tools.inspect_store import _block_offsets, _get
from schemas.signal_checks import BLOCK_SAMPLES
from schemas.layout import StoredSample
from schemas.manifest import Manifest
from schemas.reader import StoreReader

log = logging.getLogger("pipeline.inspect")

# Response rows read for the histograms of render().
MAX_HISTOGRAM_ROWS = 200_000


def overlay(image, saliency_map: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``image`` (PIL) with ``saliency_map`` [rows, cols] as a heat map: uint8 [H, W, 3].

    The map is scaled to [0, its max], upsampled to the image size (nearest: one visual token is
    one visible cell) and alpha-blended over the image through ``cmap``.
    """
    import matplotlib
    from PIL import Image

    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    sm = np.asarray(saliency_map, dtype=np.float32)
    top = float(sm.max()) if sm.size else 0.0
    norm = sm / top if top > 0 else np.zeros_like(sm)
    up = np.asarray(Image.fromarray(norm).resize(image.size, Image.Resampling.NEAREST), dtype=np.float32)
    heat = matplotlib.colormaps[cmap](np.clip(up, 0.0, 1.0))[..., :3]
    return np.clip(((1.0 - alpha) * img + alpha * heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _new_figure(width: float, height: float):
    # The object API with the Agg canvas: no pyplot, no global backend, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", sample_id)[:80]


def _instruction_text(record, j: int) -> str:
    from pipeline.data.records import IMAGE_TAG

    users = [t.text for t in record.turns if t.role == "user"]
    text = users[j].replace(IMAGE_TAG, " ") if j < len(users) else f"turn {j}"
    text = " ".join(text.split())
    return textwrap.fill(textwrap.shorten(text, 90, placeholder="..."), 36)


def _render_saliency(s: StoredSample, record, images: list, path: Path) -> None:
    blocks, turns = s.meta["visual_blocks"], s.meta["turns"]
    n_vis = sum(int(b["length"]) for b in blocks)
    maps = s.arrays["saliency"].astype(np.float32).reshape(len(turns), n_vis)
    off = _block_offsets(blocks)
    nrows, ncols = len(blocks), max(1, len(turns))
    fig = _new_figure(3.2 * ncols, 3.4 * nrows + 0.6)
    for i, b in enumerate(blocks):
        rows, cols = (int(x) for x in b["grid"])
        image = images[int(b["image_index"])]
        for j in range(len(turns)):
            ax = fig.add_subplot(nrows, ncols, i * ncols + j + 1)
            ax.imshow(overlay(image, maps[j, off[i]:off[i + 1]].reshape(rows, cols)))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_instruction_text(record, j), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"image {b['image_index']} ({rows}x{cols})", fontsize=8)
    fig.suptitle(f"saliency per turn: {s.sample_id}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _render_overlays(store: Path, reader: StoreReader, out: Path, n_samples: int, image_root, data_path) -> list[Path]:
    from pipeline.data import BadRecord, ImagePolicy, SampleError, read_records

    ds = reader.manifest.optional("dataset") or {}
    path = data_path or ds.get("path")
    root = image_root if image_root is not None else ds.get("image_root")
    if not path:
        log.warning("the manifest names no dataset and no data path was given; saliency overlays skipped")
        return []
    in_store = set(reader.sample_ids())
    written: list[Path] = []
    try:
        records = read_records(path, root, ds.get("split", "train"), ImagePolicy.from_settings(ds))
        for rec in records:
            if len(written) >= n_samples:
                break
            if isinstance(rec, BadRecord) or rec.sample_id not in in_store or not rec.images:
                continue
            s = _get(store, reader, rec.sample_id)
            if not s.meta["visual_blocks"]:
                continue
            try:
                images, hashes = rec.load()
            except SampleError as e:
                log.warning("sample %r: %s; skipped", rec.sample_id, e)
                continue
            if hashes != list(s.meta["image_hashes"]):
                log.warning("sample %r: its images in %s differ from the ones the store was dumped from "
                            "(image hash mismatch); skipped", rec.sample_id, path)
                continue
            target = out / f"saliency_{len(written):02d}_{_safe_name(rec.sample_id)}.png"
            _render_saliency(s, rec, images, target)
            written.append(target)
    except PipelineError as e:  # DataSourceError: the dataset moved or is unreadable
        log.warning("cannot read the dataset %s (%s); saliency overlays skipped. Pass data_path/image_root.", path, e)
    if not written:
        log.warning("no saliency overlay written (no sample with images found in %s)", path)
    return written


def _render_irs(m: Manifest, path: Path) -> Path | None:
    sal = m.optional("saliency") or {}
    irs, layers = sal.get("irs"), sal.get("layers") or []
    if not irs:
        log.info("no IRS table in the manifest (saliency layers %s were named in the config); IRS plot skipped",
                 layers)
        return None
    xs = sorted(int(k) for k in irs)
    ys = [irs[str(x)] for x in xs]
    fig = _new_figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, marker="o")
    for layer in layers:
        ax.axvline(layer, color="tab:red", linestyle="--")
        if str(layer) in irs:
            ax.plot([layer], [irs[str(layer)]], marker="*", markersize=14, color="tab:red")
    ax.set_xlabel("layer")
    ax.set_ylabel("IRS = 1 - E cos(α(x1), α(x2))")
    ax.set_title(f"Instruction-Relevance Score per layer (chosen: {layers})")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _render_response_hist(reader: StoreReader, path: Path) -> Path | None:
    chunks: list[np.ndarray] = []
    n = 0
    for shard, size in reader.shard_sizes().items():
        for lo in range(0, size, BLOCK_SAMPLES):
            if n >= MAX_HISTOGRAM_ROWS:
                break
            for s in reader.read_block(shard, lo, min(size, lo + BLOCK_SAMPLES)):
                lp = s.arrays["resp_logprobs"].astype(np.float64)
                chunks.append(np.where(s.arrays["resp_ids"] >= 0, lp, -np.inf))
                n += len(lp)
    if not n:
        log.info("no response positions in the store; histogram skipped")
        return None
    lp = np.concatenate(chunks)[:MAX_HISTOGRAM_ROWS]
    p = np.exp(lp)
    tail = tail_mass(torch.from_numpy(lp)).numpy()
    # Entropy of the (k+1)-bucket coarsening (top-k ids + tail): a lower bound on the full entropy.
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = -np.where(p > 0, p * lp, 0.0).sum(axis=1) - np.where(tail > 0, tail * np.log(tail), 0.0)
    fig = _new_figure(10, 3.5)
    ax = fig.add_subplot(1, 2, 1)
    ax.hist(tail, bins=50)
    ax.set_xlabel("tail mass 1 - Σ top-k p_T")
    ax.set_ylabel("response positions")
    ax = fig.add_subplot(1, 2, 2)
    ax.hist(ent, bins=50)
    ax.set_xlabel("entropy of top-k + tail (nats, lower bound)")
    fig.suptitle(f"teacher response distributions ({len(lp)} positions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def render(store_dir: str | Path, out_dir: str | Path, n_samples: int = 4, image_root: str | Path | None = None,
           data_path: str | Path | None = None) -> list[Path]:
    """Write PNGs to ``out_dir``; return their paths.

    - ``saliency_NN_<id>.png`` for up to ``n_samples`` samples with images: one panel per (image,
      turn), the turn's map overlaid on the image, the instruction text as the title. Images come
      from the dataset named in the manifest (or ``data_path`` / ``image_root``), matched by sample
      id; a sample whose image hashes differ from the stored ones is skipped with a warning.
    - ``irs.png``: IRS per layer, chosen layer marked (skipped, with a note, when layers were named).
    - ``response_distributions.png``: histograms of tail mass and top-k entropy at response positions.
    """
    store = Path(store_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = StoreReader(store)
    written = _render_overlays(store, reader, out, n_samples, image_root, data_path) if n_samples > 0 else []
    for p in (_render_irs(reader.manifest, out / "irs.png"),
              _render_response_hist(reader, out / "response_distributions.png")):
        if p is not None:
            written.append(p)
    return written

"""Does the teacher's saliency point at the right place? (the demo's grounding study)

The synthetic boards (``pipeline.tools.synthetic``) record, per turn, the cells the question is
about (``focus_cells``: the named cell, the cells of the counted colour, the two shapes compared).
For every text layer of the teacher, this computes each turn's instruction-to-visual saliency map
(the same probe and turn maps as IRS calibration, ``Teacher.layer_turn_maps``) and the fraction of
its mass on the visual tokens of those cells. The uniform baseline is the fraction a map spread
evenly over the visual tokens would put there (tokens of the focus cells ÷ all visual tokens). The
layer IRS chose for the store (``saliency.layers`` in its manifest) is marked, and the maps stored
in the store are scored the same way, an independent read of the chosen layer's signal.

A visual token belongs to the cell its centre falls in: token (r, c) of an R×C block covers rows
``r·H/R .. (r+1)·H/R`` of the board, so with a 4×4 grid over a 2×2 board each cell has 2×2
tokens. Turns without focus cells (exists, when the shape is absent) or without a map are left out.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

log = logging.getLogger("pipeline.tools.grounding")


def focus_mask(grid: tuple[int, int], board_grid: int, cells) -> np.ndarray:
    """bool [R·C], row-major over a block of R×C visual tokens: True on the tokens whose centre lies
    in one of ``cells`` ([row, col] of a ``board_grid`` × ``board_grid`` board)."""
    rows, cols = grid
    r_cell = ((np.arange(rows) + 0.5) * board_grid / rows).astype(int)
    c_cell = ((np.arange(cols) + 0.5) * board_grid / cols).astype(int)
    wanted = {(int(r), int(c)) for r, c in cells}
    return np.array([(int(r), int(c)) in wanted for r in r_cell for c in c_cell], dtype=bool)


def turn_masks(raw: dict, visual_blocks) -> list[np.ndarray | None]:
    """Per turn of a synthetic record, the focus mask over the sample's visual positions (one image,
    one block), or None where the turn has no focus cell."""
    if len(visual_blocks) != 1:
        raise ValueError(f"sample {raw.get('id')!r}: grounding needs one visual block, got {len(visual_blocks)}")
    block = visual_blocks[0]
    return [focus_mask(tuple(block.grid), int(raw["board_grid"]), cells) if cells else None
            for cells in raw["focus_cells"]]


def mass_on_focus(maps: np.ndarray, masks: list[np.ndarray | None], sees: list[bool]) -> list[tuple[int, float, float]]:
    """Per turn with a map and a focus: (turn, saliency mass on the focus tokens, uniform baseline)."""
    out = []
    for j, mask in enumerate(masks):
        if mask is None or j >= len(maps) or not sees[j] or maps[j].sum() <= 0:
            continue
        m = np.asarray(maps[j], np.float64)
        out.append((j, float(m[mask].sum() / m.sum()), float(mask.mean())))
    return out


def _summary(rows: list[tuple[str, float, float]]) -> dict:
    """rows: (question type, mass, baseline) -> mean mass and baseline, overall and by type."""
    by_type = defaultdict(list)
    for t, m, b in rows:
        by_type[t].append((m, b))
    def one(pairs):
        return {"mass": statistics.fmean(p[0] for p in pairs), "uniform": statistics.fmean(p[1] for p in pairs),
                "n_turns": len(pairs)}
    return {**one([(m, b) for _, m, b in rows]), "by_type": {t: one(v) for t, v in sorted(by_type.items())}}


def grounding(teacher: str | Path, data_path: str | Path, store: str | Path | None = None, limit: int = 200,
              max_length: int = 512, batch_size: int = 16) -> dict:
    """The grounding table of a teacher on a synthetic split (see the module docstring).

    ``store``: a store of this teacher on the same split: its chosen layer(s) and IRS table are
    reported and its stored maps scored. Returns a JSON-able dict."""
    from pipeline.data import BadRecord, ImagePolicy, read_records
    from pipeline.data.records import raw_records
    from schemas.reader import StoreReader
    from schemas.signals import unpack
    from stage1_teacher.config import SignalsConfig, TeacherConfig
    from stage1_teacher.teacher import Teacher

    data_path = Path(data_path)
    raws = raw_records(data_path)
    missing = [sid for sid, r in raws.items() if "focus_cells" not in r or "board_grid" not in r]
    if missing:
        raise ValueError(f"{data_path}: records without focus_cells/board_grid (first: {missing[0]!r}); "
                         "grounding needs the synthetic set of pipeline.tools.synthetic")
    records = [r for r in read_records(data_path, None, "test", ImagePolicy()) if not isinstance(r, BadRecord)][:limit]
    model = Teacher(TeacherConfig(path=str(teacher)), SignalsConfig())
    per_layer: dict[int, list] = defaultdict(list)
    for enc, maps, sees in model.layer_turn_maps(records, max_length, batch_size, desc="grounding"):
        raw = raws[enc.sample_id]
        masks = turn_masks(raw, enc.visual_blocks)
        for layer, m in maps.items():
            for j, mass, base in mass_on_focus(m.numpy(), masks, sees):
                per_layer[layer].append((raw["question_types"][j], mass, base))
    result = {"teacher": str(teacher), "data": str(data_path), "n_samples": len(records),
              "layers": {int(layer): _summary(rows) for layer, rows in sorted(per_layer.items())}}
    if store is not None:
        reader = StoreReader(store)
        result["chosen_layers"] = reader.manifest.saliency_layers
        irs = reader.manifest.irs
        result["irs"] = {int(k): v for k, v in irs.items()} if irs else None
        rows = []
        ids = set(reader.sample_ids())
        for rec in records:
            if rec.sample_id not in ids:
                continue
            s = unpack(reader.get(rec.sample_id))
            blocks = [_Block(tuple(b["grid"])) for b in s.visual_blocks]
            if not blocks:
                continue
            raw = raws[rec.sample_id]
            sees = [bool(row.sum() > 0) for row in s.saliency]  # an all-zero row: a turn with no map
            for j, mass, base in mass_on_focus(s.saliency, turn_masks(raw, blocks), sees):
                rows.append((raw["question_types"][j], mass, base))
        result["stored"] = _summary(rows) if rows else None
    return result


class _Block:
    """The grid of a stored visual block (what ``turn_masks`` reads of an encoded one)."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid


def format_grounding(result: dict) -> str:
    chosen = set(result.get("chosen_layers") or [])
    irs = result.get("irs") or {}
    types = sorted({t for v in result["layers"].values() for t in v["by_type"]})
    lines = ["| layer | IRS | mass on the question's cells | uniform | ratio | " + " | ".join(types) + " |",
             "|---|---|---|---|---|" + "---|" * len(types)]
    rows = [(f"{layer}{' (chosen)' if layer in chosen else ''}", irs.get(layer), v)
            for layer, v in sorted(result["layers"].items())]
    if result.get("stored"):
        rows.append(("stored maps", None, result["stored"]))
    for name, score, v in rows:
        cells = " | ".join(f"{v['by_type'][t]['mass']:.2f} / {v['by_type'][t]['uniform']:.2f}" if t in v["by_type"] else "-"
                           for t in types)
        lines.append(f"| {name} | {'-' if score is None else f'{score:.3f}'} | {v['mass']:.3f} | {v['uniform']:.3f} "
                     f"| {v['mass'] / v['uniform']:.2f} | {cells} |")
    lines.append("")
    lines.append("Per type: mass / uniform baseline.")
    return "\n".join(lines)


def plot_grounding(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted(result["layers"])
    chosen = set(result.get("chosen_layers") or [])
    types = sorted({t for v in result["layers"].values() for t in v["by_type"]})
    fig = Figure(figsize=(8, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(121)
    masses = [result["layers"][l]["mass"] for l in layers]
    ax.bar(range(len(layers)), masses, color=["tab:red" if l in chosen else "tab:blue" for l in layers])
    ax.plot(range(len(layers)), [result["layers"][l]["uniform"] for l in layers], "k--", label="uniform map")
    irs = result.get("irs") or {}
    ax.set_xticks(range(len(layers)), [f"L{l}\nIRS {irs[l]:.2f}" if l in irs else f"L{l}" for l in layers], fontsize=8)
    ax.set_ylabel("saliency mass on the question's cells")
    ax.set_ylim(0, 1)
    ax.set_title("per layer (red: chosen by IRS)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax = fig.add_subplot(122)
    width = 0.8 / max(1, len(layers))
    for i, l in enumerate(layers):
        v = result["layers"][l]["by_type"]
        xs = [k + (i - (len(layers) - 1) / 2) * width for k in range(len(types))]
        ax.bar(xs, [v[t]["mass"] if t in v else 0 for t in types], width, label=f"L{l}",
               edgecolor="black" if l in chosen else None)
    base = result["layers"][layers[0]]["by_type"]
    ax.scatter(range(len(types)), [base[t]["uniform"] if t in base else 0 for t in types], marker="_", s=400,
               color="black", label="uniform", zorder=3)
    ax.set_xticks(range(len(types)), types, fontsize=7, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_title("by question type", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_grounding(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grounding.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    (out_dir / "grounding.md").write_text(format_grounding(result) + "\n")
    plot_grounding(result, out_dir / "grounding.png")

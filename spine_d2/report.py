"""The demo's report: what a person looks at after `make demo` (report.md, report.html, PNGs).

Everything is read back from what the pipeline wrote (metrics.json of the training run,
eval_results.json, the export manifest and ZOI files, the enhancement outputs and the
alignment benchmark's JSON), so the report shows the run's own files, not a second computation.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

from .atomic import atomic_path, write_atomic, write_json
from .data.io import read_scan
from .errors import check_output_folder
from .zoi.manifest import load_manifest

__all__ = [
    "atomic_png",
    "headline",
    "loss_curves_png",
    "overlays_png",
    "zoi_grid_png",
    "enhancement_png",
    "write_report",
]

SUMMARY_KEYS = (
    "elapsed_s",
    "test.segm.AP",
    "test.segm.AP50",
    "test.vertebra.recall",
    "test.vertebra.precision",
    "test.vertebra.dice",
    "test.vertebra.level_accuracy",
    "zoi.scans",
    "zoi.suspected_missing",
    "align.tre_px_median",
    "align.psnr_gain_db",
)


def atomic_png(path: Path, img: np.ndarray) -> str:
    """Encode img as PNG under a temp name and rename: readers never see half a file."""
    check_output_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"{path}: cannot encode PNG")
    write_atomic(path, buf.tobytes())
    return str(path)


def _to8(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img.astype(np.float64) - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(
        np.uint8
    )


def read_metrics(path, latest=True) -> list:
    """Rows of detectron2's metrics.json (one JSON object per line) as the latest run left them.
    detectron2 appends to the file, so a run started again in the same folder (a second `make
    demo`) or resumed from an earlier checkpoint writes iterations that are already there: the
    rows it supersedes (from its first iteration on) are dropped, else the loss curves double
    back on themselves. ``latest=False``: every row, as written."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        row = json.loads(line)
        it = row.get("iteration")
        if latest and it is not None and rows and rows[-1].get("iteration", -1) >= it:
            rows = [r for r in rows if r.get("iteration", -1) < it]
        rows.append(row)
    return rows


def loss_curves_png(metrics_rows: list, path: Path) -> str:
    """Total loss and its parts against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in metrics_rows if "total_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    keys = ["total_loss"] + sorted(k for k in (rows[0] if rows else {}) if k.startswith("loss_"))
    for k in keys:
        it = [r["iteration"] for r in rows if k in r]
        ax.plot(it, [r[k] for r in rows if k in r], label=k, lw=2 if k == "total_loss" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("fine-tuning losses (detectron2 metrics.json)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return str(path)


def _scan_path(line: dict, image_root: str) -> str:
    return os.path.join(image_root, line["path"])


def overlays_png(manifest_lines: list, image_root: str, path: Path, n: int = 6, tile: int = 320):
    """``n`` scans with their predicted masks, levels and scores (detectron2's Visualizer)."""
    from detectron2.utils.visualizer import Visualizer

    tiles = []
    for line in manifest_lines[:n]:
        scan = read_scan(_scan_path(line, image_root))
        rgb = np.repeat(_to8(scan.image)[..., None], 3, axis=2)
        vis = Visualizer(rgb, scale=1.0)
        zois = line["zois"]
        if zois:
            masks = [mask_util.decode(z["mask_rle"]).astype(bool) for z in zois]
            labels = [f"{z['level'] or z['class']} {z['score']:.2f}" for z in zois]
            vis.overlay_instances(masks=masks, labels=labels, alpha=0.35)
        img = vis.output.get_image()[:, :, ::-1]
        scale = tile / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)))
        canvas = np.zeros((tile, tile, 3), np.uint8)
        canvas[: img.shape[0], : img.shape[1]] = img
        miss = len(line.get("suspected_missing", []))
        cv2.putText(
            canvas, f"{Path(line['path']).name}  {len(zois)} ZOIs, {miss} suspected missing",
            (4, tile - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA,
        )  # fmt: skip
        tiles.append(canvas)
    return atomic_png(path, _grid(tiles, cols=3))


def _grid(tiles: list, cols: int, gap: int = 4) -> np.ndarray:
    if not tiles:
        return np.zeros((32, 32, 3), np.uint8)
    h, w = tiles[0].shape[:2]
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = t
    return out


def zoi_grid_png(manifest_lines: list, export_dir: str, path: Path, n: int = 24, tile: int = 96):
    """Exported ZOI files (pixels under the mask, alpha as given) on black, labelled by level."""
    tiles = []
    for line in manifest_lines:
        for z in line["zois"]:
            if len(tiles) >= n:
                break
            f = os.path.join(export_dir, z["file"])
            img = cv2.imread(f, cv2.IMREAD_UNCHANGED)
            if img is None or img.ndim != 3 or img.shape[2] < 2:
                continue
            gray, alpha = img[..., 0].astype(np.float64), img[..., -1] > 0
            view = np.zeros(gray.shape, np.uint8)
            if alpha.any():
                lo, hi = np.percentile(gray[alpha], [1, 99])
                view = np.clip((gray - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
                view[~alpha] = 0
            scale = (tile - 14) / max(view.shape)
            view = cv2.resize(
                view, (max(1, round(view.shape[1] * scale)), max(1, round(view.shape[0] * scale)))
            )
            canvas = np.zeros((tile, tile, 3), np.uint8)
            canvas[: view.shape[0], : view.shape[1]] = view[..., None]
            label = f"{z['level'] or z['class']} {z['score']:.2f}"
            cv2.putText(
                canvas, label, (2, tile - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 220, 255), 1
            )
            tiles.append(canvas)
    return atomic_png(path, _grid(tiles, cols=8))


def enhancement_png(results: list, path: Path, n: int = 3, crop: int = 256) -> str:
    """[low dose | enhanced | high-dose reference] crops around the vertebrae of ``n`` pairs.

    ``results``: dicts with ``low``, ``high``, ``enhanced`` paths and the vertebra ``boxes``
    (x0, y0, x1, y1) of the low-dose scan."""
    rows = []
    for r in results[:n]:
        low = read_scan(r["low"]).pixels.astype(np.float64)
        enh = read_scan(r["enhanced"]).pixels.astype(np.float64)
        high = read_scan(r["high"]).pixels.astype(np.float64)
        boxes = np.asarray(r["boxes"], np.float64).reshape(-1, 4)
        cx, cy = (boxes[:, [0, 2]].mean(), boxes[:, [1, 3]].mean()) if len(boxes) else (
            low.shape[1] / 2, low.shape[0] / 2)  # fmt: skip
        x0 = int(np.clip(cx - crop / 2, 0, max(low.shape[1] - crop, 0)))
        y0 = int(np.clip(cy - crop / 2, 0, max(low.shape[0] - crop, 0)))
        sl = np.s_[y0 : y0 + crop, x0 : x0 + crop]
        lo, hi = np.percentile(low[sl], [0.5, 99.5])
        to8 = lambda a: np.clip((a - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(
            np.uint8
        )  # noqa: E731
        hlo, hhi = np.percentile(high[sl], [0.5, 99.5])
        high8 = np.clip((high[sl] - hlo) / max(hhi - hlo, 1e-9) * 255, 0, 255).astype(np.uint8)
        parts = [to8(low[sl]), to8(enh[sl]), high8]
        gap = np.full((parts[0].shape[0], 4), 255, np.uint8)
        rows.append(np.hstack([parts[0], gap, parts[1], gap, parts[2]]))
    if not rows:
        return atomic_png(path, np.zeros((32, 32), np.uint8))
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, w - r.shape[1])), constant_values=255) for r in rows]
    return atomic_png(path, np.vstack(rows))


def headline(summary: dict) -> list:
    """The lines printed at the end of the demo."""
    f = lambda k, fmt="{:.3f}": (
        "n/a" if summary.get(k) is None else fmt.format(summary[k])
    )  # noqa: E731
    return [
        f"test split: segm AP {f('test.segm.AP', '{:.1f}')}, AP50 {f('test.segm.AP50', '{:.1f}')}; "
        f"vertebra recall {f('test.vertebra.recall')}, precision {f('test.vertebra.precision')}, "
        f"Dice {f('test.vertebra.dice')}, level accuracy {f('test.vertebra.level_accuracy')}",
        f"ZOI export: {f('zoi.scans', '{:d}')} scans, {f('zoi.suspected_missing', '{:d}')} "
        f"suspected missed vertebrae",
        f"alignment: median TRE {f('align.tre_px_median', '{:.2f}')} px (predicted masks), "
        f"PSNR gain in vertebrae {f('align.psnr_gain_db', '{:+.1f}')} dB over the low-dose scan",
        f"elapsed {f('elapsed_s', '{:.0f}')} s",
    ]


def _table_md(rows: list) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _table_html(rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "n/a" if v is None else v


def write_report(out_dir, *, summary: dict, eval_results: dict, figures: dict, notes=()) -> dict:
    """report.md, report.html and summary.json in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    sections = []
    metric_rows = [["metric", "value"]] + [[k, _fmt(summary.get(k))] for k in SUMMARY_KEYS]
    sections.append(("Headline figures (summary.json)", metric_rows))
    for task in ("bbox", "segm"):
        if task in eval_results:
            r = eval_results[task]
            keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in r]
            sections.append(
                (f"COCO {task} AP (test split, percent)", [keys, [_fmt(r[k]) for k in keys]])
            )
    if "vertebra" in eval_results:
        v = eval_results["vertebra"]
        keys = [k for k in v if not k.startswith("recall/")]
        sections.append(
            (
                "VertebraEvaluator (test split)",
                [["metric", "value"]] + [[k, _fmt(v[k])] for k in keys],
            )
        )
        levels = [k for k in v if k.startswith("recall/")]
        if levels:
            sections.append(
                (
                    "Recall per level",
                    [[k.split("/", 1)[1] for k in levels], [_fmt(v[k]) for k in levels]],
                )
            )
    md = ["# spine-d2 demo report", ""]
    md += [f"- {n}" for n in notes] + [""]
    doc = [
        "<!doctype html><meta charset='utf-8'><title>spine-d2 demo report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:100%}</style>",
        "<h1>spine-d2 demo report</h1>",
        "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>",
    ]
    for title, rows in sections:
        md += [f"## {title}", "", _table_md(rows), ""]
        doc += [f"<h2>{html.escape(title)}</h2>", _table_html(rows)]
    for title, fig in figures.items():
        rel = os.path.relpath(fig, out)
        md += [f"## {title}", "", f"![{title}]({rel})", ""]
        doc += [f"<h2>{html.escape(title)}</h2>", f"<img src='{html.escape(rel)}' alt=''>"]
    paths = {}
    for name, text in (("report.md", "\n".join(md)), ("report.html", "\n".join(doc))):
        p = out / name
        write_atomic(p, text)
        paths[name] = str(p)
    p = out / "summary.json"
    write_json(p, summary)  # strict JSON: a figure that could not be measured reads null
    paths["summary.json"] = str(p)
    return paths


def manifest_lines(manifest_path) -> list:
    """Manifest lines in path order."""
    return [v for _, v in sorted(load_manifest(manifest_path).items())]

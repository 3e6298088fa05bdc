"""The report's pictures: example thumbnails and grids, and its charts (error rate per VoG
decile, vog_raw per class, VoG against training dynamics).

Charts are drawn on matplotlib's Agg canvas through ``Figure`` objects, never pyplot, so no
global backend state changes in the caller's process.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from PIL import Image

from vog_ray import storage

logger = logging.getLogger(__name__)

DECILES = 10
THUMB_SIZE = 96


def floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls; all NaN when the column is absent."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()


def thumbnail(image: Image.Image, size: int = THUMB_SIZE) -> Image.Image:
    """Fit ``image`` in ``size`` pixels: small images grow by a whole factor, nearest-neighbour."""
    width, height = image.size
    longest = max(width, height)
    if longest <= size:
        factor = max(1, size // longest)
        return image.resize((width * factor, height * factor), Image.Resampling.NEAREST)
    scale = size / longest
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(shape, Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def grid_image(low: list, high: list, columns: int = 4, cell: int = THUMB_SIZE) -> Image.Image:
    """Lowest-VoG images on the left, highest on the right, a gap between; gray where missing."""
    rows = max(1, -(-max(len(low), len(high)) // columns))
    gap = cell // 2
    canvas = Image.new("RGB", (2 * columns * cell + gap, rows * cell), "white")
    for offset, images in ((0, low), (columns * cell + gap, high)):
        for position, image in enumerate(images):
            x = offset + (position % columns) * cell
            y = (position // columns) * cell
            tile = Image.new("RGB", (cell, cell), (200, 200, 200))
            if image is not None:
                small = thumbnail(image.convert("RGB"), cell)
                tile.paste(small, ((cell - small.width) // 2, (cell - small.height) // 2))
            canvas.paste(tile, (x, y))
    return canvas


def _save(figure: Figure, report_url: str, name: str,
          storage_options: dict[str, Any] | None = None) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    storage.write_bytes(storage.join(report_url, name), buffer.getvalue(), storage_options)
    return name


def error_by_decile(scores: pa.Table) -> list[dict[str, Any]]:
    """Per decile of ``vog`` (1 = lowest): count, VoG range and error rate ``1 - correct_last``.

    Only rows with both a ``vog`` and a true label count. Deciles split the rows by rank, so ties
    never leave one empty. Empty when the audit has no true labels.
    """
    if "correct_last" not in scores.column_names:
        return []
    vog = floats(scores, "vog")
    correct = floats(scores, "correct_last")
    keep = ~np.isnan(vog) & ~np.isnan(correct)
    if not keep.any():
        return []
    vog, wrong = vog[keep], correct[keep] == 0
    ranks = np.empty(len(vog), dtype=np.int64)
    ranks[np.argsort(vog, kind="stable")] = np.arange(len(vog))
    deciles = ranks * DECILES // len(vog)
    rows = []
    for decile in range(DECILES):
        members = deciles == decile
        if members.any():
            rows.append({"decile": decile + 1, "count": int(members.sum()),
                         "vog_min": float(vog[members].min()), "vog_max": float(vog[members].max()),
                         "error_rate": float(wrong[members].mean())})
    return rows


def mean_vog_by(scores: pa.Table, column: str) -> list[dict[str, Any]]:
    """Mean and count of ``vog`` per value of an integer column; null values form 'never'."""
    if column not in scores.column_names:
        return []
    groups = floats(scores, column)
    vog = floats(scores, "vog")
    keep = ~np.isnan(vog)
    if not keep.any() or np.isnan(groups[keep]).all():
        return []
    rows = []
    for value in np.unique(groups[keep & ~np.isnan(groups)]):
        members = keep & (groups == value)
        rows.append({"value": str(int(value)), "count": int(members.sum()),
                     "mean_vog": float(vog[members].mean())})
    never = keep & np.isnan(groups)
    if never.any():
        rows.append({"value": "never", "count": int(never.sum()),
                     "mean_vog": float(vog[never].mean())})
    return rows


def _decile_figure(rows: list[dict[str, Any]], report_url: str,
                   storage_options: dict[str, Any] | None = None) -> str:
    figure = Figure(figsize=(6, 3.2))
    axes = figure.add_subplot()
    axes.bar([r["decile"] for r in rows], [r["error_rate"] for r in rows], color="#c0504d")
    axes.set_xticks(range(1, DECILES + 1))
    axes.set_xlabel("VoG decile (1 = lowest)")
    axes.set_ylabel("error rate of the last checkpoint")
    axes.set_ylim(0, max(0.05, max(r["error_rate"] for r in rows) * 1.15))
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, report_url, "error_by_decile.png", storage_options)


def _distribution_figure(scores: pa.Table, report_url: str,
                         storage_options: dict[str, Any] | None = None) -> str | None:
    labels, raw = floats(scores, "label"), floats(scores, "vog_raw")
    keep = ~np.isnan(labels) & ~np.isnan(raw)
    classes = np.unique(labels[keep])
    if len(classes) == 0:
        return None
    values = [raw[keep & (labels == label)] for label in classes]
    figure = Figure(figsize=(max(6, 0.45 * len(classes) + 2), 3.4))
    axes = figure.add_subplot()
    axes.boxplot(values, showfliers=True, flierprops={"markersize": 2, "alpha": 0.5})
    axes.set_xticks(range(1, len(classes) + 1), [str(int(c)) for c in classes],
                    rotation=90 if len(classes) > 30 else 0)
    if (raw[keep] > 0).all():
        axes.set_yscale("log")
    axes.set_xlabel("class (label)")
    axes.set_ylabel("vog_raw")
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, report_url, "vog_raw_by_class.png", storage_options)


def _dynamics_figure(
    panels: dict[str, list[dict[str, Any]]], report_url: str,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    shown = {name: rows for name, rows in panels.items() if rows}
    if not shown:
        return None
    figure = Figure(figsize=(5.5 * len(shown), 3.2))
    for position, (name, rows) in enumerate(shown.items(), start=1):
        axes = figure.add_subplot(1, len(shown), position)
        positions = range(len(rows))
        axes.bar(positions, [r["mean_vog"] for r in rows], color="#4f81bd")
        axes.set_xticks(positions, [r["value"] for r in rows])
        axes.axhline(0, color="black", linewidth=0.8)
        axes.set_xlabel(name)
        axes.set_ylabel("mean VoG (class-normalized)")
        axes.grid(axis="y", alpha=0.3)
    return _save(figure, report_url, "vog_by_dynamics.png", storage_options)


def write_figures(report_url: str, scores: pa.Table,
                  storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Draw every chart the data allows into ``report_url``; the tables behind them as well."""
    deciles = error_by_decile(scores)
    dynamics = {"learned_at": mean_vog_by(scores, "learned_at"),
                "forgetting_events": mean_vog_by(scores, "forgetting_events")}
    figures = {
        "deciles": deciles,
        "deciles_png": _decile_figure(deciles, report_url, storage_options) if deciles else None,
        "distribution_png": _distribution_figure(scores, report_url, storage_options),
        "dynamics": dynamics,
        "dynamics_png": _dynamics_figure(dynamics, report_url, storage_options),
    }
    if not deciles:
        logger.info("no true labels with scores: the report leaves out the error-rate chart")
    return figures

"""The benchmark's tables (Markdown) and its checks that every mode gives the same scores."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

MIB = 2**20
FLOAT_MEDIAN = 1e-4
FLOAT_MAX = 0.01
MIN_SPEARMAN = 0.99
FLAT_MEMORY = 0.10


def _reference(rows: list[dict], row: dict) -> dict | None:
    """The plain fp32 eager limit of the same N and K."""
    for other in rows:
        if (other["mode"] == "limit" and other["n"] == row["n"] and other["k"] == row["k"]
                and other["precision"] == "fp32" and not other["compile"]):
            return other
    return None


def table(rows: list[dict], *, sweep: bool = False) -> list[str]:
    """One Markdown row per run."""
    head = ["run", "examples/s", "x limit", "seconds", "peak RSS tree (MiB)",
            "main process max RSS (MiB)", "CPU s", "load avg", "notes"]
    if sweep:
        head[1:1] = ["N", "K", "example-checkpoints/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        reference = _reference(rows, row)
        ratio = row["examples_per_s"] / reference["examples_per_s"] if reference else float("nan")
        cells = [row["name"], f"{row['examples_per_s']:.1f}", f"{ratio:.2f}",
                 f"{row['seconds']:.1f}", f"{row['peak_tree_rss'] / MIB:.0f}",
                 f"{row['main_max_rss'] / MIB:.0f}", f"{row['cpu_s']:.0f}",
                 f"{row['load_before']:.1f} / {row['load_after']:.1f}", _notes(row)]
        if sweep:
            cells[1:1] = [str(row["n"]), str(row["k"]),
                          f"{row['examples_per_s'] * row['k']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(row: dict) -> str:
    notes = []
    if row["mode"] == "vog_ray":
        notes.append(f"Ray start {row['ray_start_s']:.1f} s, score() {row['score_s']:.1f} s, "
                     f"{row['max_processes']} processes")
    if "threads" in row:
        notes.append(f"{row['threads']} torch threads")
    if row.get("warmup_s") is not None:
        notes.append(f"warm-up batch {row['warmup_s']:.1f} s (untimed)")
    if row.get("gpu_peak_mib"):
        notes.append(f"GPU peak {row['gpu_peak_mib']:.0f} MiB")
    return "; ".join(notes)


def check_scores(rows: list[dict]) -> list[str]:
    """Every run against the fp32 limit: float tolerance for fp32, rank correlation for bf16."""
    lines, failed = ["", "Scores against the fp32 limit:"], False
    for row in rows:
        reference = _reference(rows, row)
        if reference is None or row is reference:
            continue
        ok, text = compare(row["scores"], reference["scores"], fp32=row["precision"] == "fp32")
        failed |= not ok
        lines.append(f"- {row['name']}: {text} -> {'ok' if ok else 'DIFFERENT'}")
    lines.append("all scores agree" if not failed else "SOME SCORES DISAGREE")
    return lines


def compare(scores: np.ndarray, reference: np.ndarray, *, fp32: bool) -> tuple[bool, str]:
    """(agrees, description): median and max relative difference, Spearman's rho."""
    missing = int(np.sum(~np.isfinite(scores)))
    relative = np.abs(scores / reference - 1)
    relative = relative[np.isfinite(relative)]
    rho = float(spearmanr(scores, reference, nan_policy="omit").statistic)
    text = (f"median rel. diff {np.median(relative):.1e}, max {np.max(relative):.1e}, "
            f"Spearman {rho:.5f}, {missing} missing")
    if fp32:
        ok = np.median(relative) < FLOAT_MEDIAN and np.max(relative) < FLOAT_MAX
    else:
        ok = rho >= MIN_SPEARMAN
    return ok and missing == 0, text


def sweep_checks(rows: list[dict]) -> list[str]:
    """Cost per example-checkpoint across the sweep, and vog_ray's memory from 2k to 20k."""
    lines = [""]
    for mode in ("limit", "vog_ray"):
        mine = [r for r in rows if r["mode"] == mode]
        per_unit = [r["seconds"] / (r["n"] * r["k"]) * 1e3 for r in mine]
        lines.append(f"- {mode}: ms per example-checkpoint "
                     f"{', '.join(f'{v:.2f}' for v in per_unit)} "
                     f"(spread {max(per_unit) / min(per_unit) - 1:.0%})")
        by_n = {r["n"]: r["peak_tree_rss"] for r in mine if r["k"] == 5}
        if 2_000 in by_n and 20_000 in by_n:
            growth = by_n[20_000] / by_n[2_000] - 1
            flat = "flat" if abs(growth) <= FLAT_MEMORY else "NOT flat"
            lines.append(f"  peak RSS N=20k vs N=2k: {growth:+.1%} ({flat} within 10%)")
    lines.extend(check_scores(rows))
    return lines

"""Plain-text summaries for the terminal."""

from __future__ import annotations

from typing import Any

import numpy as np

from vog_ray.findings import read_scores


def top_per_class(output: str, per_class: int = 3) -> dict[int, list[tuple[str, float]]]:
    """The highest-VoG keys of each class of an audit."""
    table = read_scores(output)
    labels = table.column("label").to_numpy()
    keys = np.array(table.column("key").to_pylist())
    vog = np.nan_to_num(table.column("vog").to_numpy(zero_copy_only=False), nan=-np.inf)
    top = {}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        best = rows[np.argsort(-vog[rows], kind="stable")[:per_class]]
        top[int(label)] = [(str(keys[i]), float(vog[i])) for i in best]
    return top


def demo_summary(result: dict[str, Any]) -> str:
    lines = [f"vog-ray demo finished in {result['wall_time_s']} s; files under {result['output']}"]
    for name, audit in result["audits"].items():
        c = audit["counts"]
        lines.append(f"  audit {name:10s} {c['scored']} scored, {c['failed']} failed, "
                     f"{audit['wall_time_s']:.1f} s -> {audit['files']['scores']}")
    lines.append("highest VoG per class (training split, key: vog):")
    for label, items in top_per_class(result["audits"]["train"]["output"]).items():
        lines.append(f"  {label}: " + ", ".join(f"{k} {v:+.2f}" for k, v in items))
    noise = result["findings"]["label_noise"]
    lines.append(f"flipped labels: base rate {noise['base_rate']:.1%} of {noise['examples']} "
                 "training examples; share in the top VoG decile and ROC AUC:")
    for target, key in (("logit", "label_noise"), ("loss", "label_noise_loss_target")):
        found = result["findings"][key]
        for column in ("vog", "vog_early", "vog_late"):
            if column in found:
                f = found[column]
                lines.append(f"  --target {target:5s} {column:9s} {f['top_decile_share']:6.1%} "
                             f"(x{f['lift']:.1f} the base rate), ROC AUC {f['roc_auc']:.3f}")
    lines.append("test error by VoG decile, lowest VoG first:")
    for label, rates in result["findings"]["test_error_by_decile"].items():
        lines.append(f"  --label {label:4s} " + " ".join(f"{r:.2f}" for r in rates))
    return "\n".join(lines)

"""Throughput and memory of VoG scoring, measured side by side: ``make bench``.

Three ways to score the same workload (scikit-learn digits upsampled to RGB, repeated to N,
K checkpoints of a torchvision network), each in a process of its own so that its memory is its
own:

- limit: preloaded tensors, K frozen models, forward and input backward only;
- baseline: the plain loop users write by hand, every gradient map kept;
- vog_ray: the engine end to end, WebDataset shards through local Ray to Parquet.

Prints examples per second, the ratio to the limit, the peak RSS of each process tree, and
checks that all three give the same scores. ``--variants`` adds bf16, torch.compile, the vmap
checkpoint batching and both actor layouts; ``--sweep`` shows how time and memory grow with K
and N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import workload
from measure import measure
from report import check_scores, sweep_checks, table

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--n", type=int, default=10_000, help="examples")
    add("--k", type=int, default=5, help="checkpoints")
    add("--batch-size", type=int, default=64)
    add("--model", default="resnet18", help="torchvision model name")
    add("--image-size", type=int, default=32)
    add("--format", dest="image_format", choices=["png", "jpg"], default="png")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--precision", choices=["fp32", "bf16"], default="fp32")
    add("--compile", action="store_true", help="torch.compile in the limit and in vog_ray")
    add("--checkpoint-batching", choices=["loop", "vmap"], default="loop")
    add("--num-workers", type=int, help="vog_ray actors (default: the engine's choice)")
    add("--threads-per-worker", type=int, help="torch threads per actor (default: engine's)")
    add("--threads", type=int, help="torch threads of the limit and the baseline (default: all)")
    add("--prefetch", type=int, default=2)
    add("--shard-size", type=int, help="examples per shard (default: 16 batches)")
    add("--modes", default="limit,baseline,vog_ray", help="comma list of modes to run")
    add("--variants", action="store_true",
        help="also run bf16, compile, vmap and both actor layouts (limit and vog_ray)")
    add("--sweep", action="store_true",
        help="instead: vog_ray and the limit at K = 2, 5, 10 and N = 2k, 10k, 20k")
    add("--out", default=os.path.join(os.path.dirname(HERE), "out", "bench"))
    return parser.parse_args(argv)


def base_spec(args: argparse.Namespace, *, n: int, k: int) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shard_size = args.shard_size or 16 * args.batch_size
    work = workload.prepare(args.out, n=n, k=k, model=args.model, image_size=args.image_size,
                            image_format=args.image_format, per_shard=shard_size, device=device)
    return {
        "workload": work.to_dict(), "batch_size": args.batch_size, "device": device,
        "precision": args.precision, "compile": args.compile,
        "checkpoint_batching": args.checkpoint_batching, "num_workers": args.num_workers,
        "threads_per_worker": args.threads_per_worker, "threads": args.threads,
        "prefetch": args.prefetch,
    }


def run_one(name: str, mode: str, spec: dict, out: str) -> dict:
    """Run one mode in its own process; its timings, usage and scores."""
    run_dir = os.path.join(out, "runs", name.replace(" ", "_").replace(",", ""))
    os.makedirs(run_dir, exist_ok=True)
    spec = {**spec, "run_dir": run_dir}
    spec_path = os.path.join(run_dir, "spec.json")
    result_path = os.path.join(run_dir, "result.json")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    if os.path.exists(result_path):
        os.remove(result_path)
    print(f"-- {name} ...", flush=True)
    usage = measure([sys.executable, os.path.join(HERE, "modes.py"), mode, spec_path,
                     result_path])
    if usage.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {usage.returncode}")
    with open(result_path) as handle:
        result = json.load(handle)
    n = spec["workload"]["n"]
    row = {"name": name, "mode": mode, "n": n, "k": len(spec["workload"]["checkpoints"]),
           "precision": spec["precision"], "compile": spec["compile"],
           "batching": spec["checkpoint_batching"], **result, **usage.__dict__,
           "examples_per_s": n / result["seconds"]}
    row["scores"] = np.load(os.path.join(run_dir, "scores.npy"))
    print(f"   {row['examples_per_s']:.1f} examples/s, {result['seconds']:.1f} s, "
          f"peak tree RSS {usage.peak_tree_rss / 2**20:.0f} MiB", flush=True)
    return row


def variant_runs(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(name, mode, spec overrides) of the main comparison, and of ``--variants``."""
    modes = [m for m in args.modes.split(",") if m]
    runs = [(mode, mode, {}) for mode in modes]
    if not args.variants:
        return runs
    runs += [
        ("limit bf16", "limit", {"precision": "bf16"}),
        ("vog_ray bf16", "vog_ray", {"precision": "bf16"}),
        ("limit compile", "limit", {"compile": True}),
        ("vog_ray compile", "vog_ray", {"compile": True}),
        ("vog_ray vmap", "vog_ray", {"checkpoint_batching": "vmap"}),
    ]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return runs  # one actor per GPU: there is no layout to choose
    cpus = os.cpu_count() or 1
    return runs + [
        (f"vog_ray 1 actor x {cpus} threads", "vog_ray",
         {"num_workers": 1, "threads_per_worker": cpus}),
        (f"vog_ray {cpus} actors x 1 thread", "vog_ray",
         {"num_workers": cpus, "threads_per_worker": 1}),
    ]


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": _cpu_model()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps(machine()), flush=True)
    if args.sweep:
        rows = sweep(args)
        lines = table(rows, sweep=True) + sweep_checks(rows)
    else:
        spec = base_spec(args, n=args.n, k=args.k)
        rows = [run_one(name, mode, {**spec, **over}, args.out)
                for name, mode, over in variant_runs(args)]
        lines = table(rows) + check_scores(rows)
    print("\n".join(lines))
    save(args, rows, lines)
    return 0


def sweep(args: argparse.Namespace) -> list[dict]:
    """vog_ray and the limit at K = 2, 5, 10 (N = 10k) and N = 2k, 10k, 20k (K = 5)."""
    points = [(10_000, 2), (10_000, 5), (10_000, 10), (2_000, 5), (20_000, 5)]
    rows = []
    for n, k in points:
        spec = base_spec(args, n=n, k=k)
        for mode in ("limit", "vog_ray"):
            rows.append(run_one(f"{mode} N={n} K={k}", mode, spec, args.out))
    return rows


def save(args: argparse.Namespace, rows: list[dict], lines: list[str]) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"results-{'sweep-' if args.sweep else ''}{stamp}")
    kept = [{k: v for k, v in row.items() if k != "scores"} for row in rows]
    with open(path + ".json", "w") as handle:
        json.dump({"args": vars(args), "machine": machine(), "rows": kept}, handle, indent=1)
    with open(path + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"results written to {path}.json and .md")


if __name__ == "__main__":
    sys.exit(main())

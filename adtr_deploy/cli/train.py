"""`adtr-train` / `adtr train`: train an ADTR model on a data folder, calibrate it, evaluate it."""

from __future__ import annotations

import click

from adtr_deploy.cli.common import CONTEXT, quiet_option, tile_option, user_errors, workers_option
from adtr_deploy.cli.train_options import (
    augment_options,
    feedback_option,
    model_options,
    parse_input_size,
    parse_stages,
)


@click.command(context_settings=CONTEXT)
@click.option(
    "--data",
    "data_root",
    default=None,
    type=click.Path(path_type=str),
    help="Data folder: an MVTec-AD root (ROOT/NAME/train/good ...), a folder of CIFAR-10/100 'python version' batches, "
    "or a plain folder of good images (training only, no --category). Required, except with --feedback (default: the "
    "--init-from checkpoint's data and category) and --resume (the run's).",
)
@click.option(
    "--category",
    default=None,
    help="MVTec-AD category folder name, or the normal CIFAR class (name like 'airplane' or index 0-9/0-99). "
    "Omit for a plain image folder. Several MVTec categories: 'a,b' or 'all' (one run each in OUT/<category>, "
    "and OUT/summary.md/.json).",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=str), help="Run folder: checkpoint.pt, logs, metrics."
)
@model_options
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs (default 30, 2 with --feedback; the paper: 500 on a GPU).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Training batch size (the paper: 16 with 500 epochs on a GPU; 4 makes 4x the steps per CPU minute).",
)
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
@click.option(
    "--threshold-margin",
    type=click.FloatRange(0.0, 1.0),
    default=0.15,
    show_default=True,
    help="Lift the calibrated threshold this share of the way from the good images' rule toward synthetic defects drawn "
    "on the calibration images (never lowered; 0 = the good images alone). See docs/robustness.md.",
)
@augment_options
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
@workers_option
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
@click.option(
    "--mode",
    type=click.Choice(["adtr", "adtr+"]),
    default="adtr",
    show_default=True,
    help="adtr: good images only (MSE). adtr+: also anomalies, with the pixel loss L_px and image loss L_img.",
)
@click.option(
    "--init-from",
    type=click.Path(exists=True, path_type=str),
    default=None,
    help="Start from this checkpoint (or run folder) instead of a fresh transformer: the paper's ADTR -> ADTR+ "
    "fine-tuning. The model configuration comes from it (--preset is ignored).",
)
@feedback_option
@click.option(
    "--synthetic",
    default=None,
    help="adtr+: synthetic anomalies pasted on the good images, comma-separated from confetti, cutpaste, scar, or "
    "'none' [default: confetti,cutpaste when neither --anomalies nor --external is given].",
)
@click.option(
    "--anomalies",
    type=click.Path(path_type=str),
    default=None,
    help="adtr+: folder of real anomalous images set apart for training, MVTec layout (ROOT/<defect>/*.png, masks in "
    "ROOT/ground_truth/<defect>/<stem>_mask.png). Never the evaluated test split (refused).",
)
@click.option(
    "--external",
    default=None,
    help="adtr+: irrelevant images used as image-level anomalies (L_img): a folder of images, or cifar100:PATH / "
    "cifar10:PATH for the train images of a local CIFAR copy (the CIFAR-10 protocol uses CIFAR-100).",
)
@click.option("--alpha", type=float, default=0.003, show_default=True, help="adtr+: weight of the push terms.")
@tile_option
@click.option(
    "--topk", type=click.IntRange(min=1), default=20, show_default=True, help="adtr+: k of L_img's top-k mean."
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Data-parallel processes on this machine (DDP, launched through torchrun; one GPU each with --device cuda). "
    "--batch-size stays the global batch.",
)
@click.option(
    "--devices",
    default=None,
    help="Spread several categories over GPUs, e.g. cuda:0,cuda:1: one worker per GPU, categories round-robin.",
)
@quiet_option
@click.pass_context
@user_errors
def command(ctx: click.Context, data_root: str, category: str | None, out_dir: str, **opts) -> None:
    """Train an ADTR anomaly detector on good images.

    Writes OUT/checkpoint.pt (loadable with torch.load(weights_only=True)), OUT/train_log.jsonl and, when the data has
    a test split, OUT/metrics.json. The frozen backbone's features are computed once and cached, so each epoch costs only
    the transformer. Scores are calibrated on held-out good images (--val-fraction). --mode adtr+ trains (or, with
    --init-from, fine-tunes) with anomalies as well: synthetic, real (--anomalies) or external (--external); the
    backbone then runs on every batch, since the anomalies change every epoch.

    \b
    Examples:
      adtr-train --data demo_data --category brick --out runs/brick
      adtr-train --data mvtec_ad --category bottle --out runs/bottle --device cuda --epochs 500
      adtr-train --data cifar-10-batches-py --category airplane --out runs/airplane
      adtr-train --data my_good_images --out runs/line1
      adtr-train --data demo_data --category brick --out runs/brick --resume
      adtr-train --data demo_data --category brick --out runs/brick+ --mode adtr+ --init-from runs/brick
      adtr-train --init-from runs/brick --feedback line1/review --out runs/brick-fb1
      adtr-train --data cifar-10-batches-py --category airplane --out runs/airplane+ --mode adtr+ \
          --external cifar100:cifar-100-python
    """
    from pathlib import Path

    from adtr_deploy.cli.common import require_torch

    require_torch("adtr-train")
    from adtr_deploy.train import distributed, multi, plan

    nproc, devices = opts.pop("nproc"), multi.parse_devices(opts.pop("devices"))
    if nproc > 1:
        if devices:
            raise click.ClickException("--nproc and --devices do not combine; use one of them")
        if distributed.launched_by_torchrun():
            raise click.ClickException("--nproc is given but this process already runs under torchrun; drop --nproc")
        raise SystemExit(_launch_torchrun(ctx, nproc))
    review_dir, fb = opts.pop("feedback"), None
    if review_dir is not None or data_root is None:  # --feedback: the review decides the mode, data from the checkpoint
        from adtr_deploy.train.feedback import prepare

        fb, opts["mode"], data_root, category = prepare(
            review_dir, data_root, category, out_dir, _given(ctx, opts), **opts
        )
    categories = multi.parse_categories(data_root, category)
    if fb is not None and categories is not None:
        raise click.ClickException("--feedback continues training one model; give one --category")
    if devices and categories is None:
        raise click.ClickException("--devices spreads several categories over GPUs; give --category a,b or all")
    plan.check_options(opts["mode"], _given(ctx, opts), resume=opts["resume"], init_from=opts["init_from"])
    distributed.setup(opts["device"])
    try:
        if categories is None:
            _train_one(ctx, data_root, category, out_dir, feedback=fb, **opts)
            return
        out = Path(out_dir)
        if devices:
            assignment = multi.round_robin(categories, devices)
            errors = multi.run_on_devices(
                assignment, lambda c: _child_args(ctx, category=c, out_dir=str(out / c), device="cuda"), out
            )
        else:
            errors = multi.run_sequential(categories, lambda c: _train_one(ctx, data_root, c, str(out / c), **opts))
        if distributed.is_main():
            summary = multi.summarize(out, categories, errors)
            click.echo(multi.summary_markdown(summary), nl=False)
            click.echo(f"summary: {out / multi.SUMMARY_MD}")
        failed = [c for c, e in errors.items() if e]
        if failed:
            raise click.ClickException(
                f"{len(failed)} of {len(categories)} categories failed ({', '.join(failed)}); see {out / multi.SUMMARY_MD}"
            )
    finally:
        distributed.teardown()


def _train_one(ctx: click.Context, data_root: str, category: str | None, out_dir: str, feedback=None, **opts):
    """One category's run (the whole single-run command); returns the checkpoint path. `feedback`: --feedback's
    review folder, read (train/feedback.py)."""
    from pathlib import Path

    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.train import feedback as feedbacks
    from adtr_deploy.train import plan as plans
    from adtr_deploy.train.config import DEFAULT_EPOCHS, TrainConfig
    from adtr_deploy.train.trainer import train

    out = Path(out_dir)
    given = _given(ctx, opts)
    values = {
        "epochs": opts["epochs"] or (feedbacks.FEEDBACK_EPOCHS if feedback else DEFAULT_EPOCHS),
        "batch_size": opts["batch_size"],
        "lr": opts["lr"],
        "seed": opts["seed"],
        "val_fraction": opts["val_fraction"],
        "threshold_margin": opts["threshold_margin"],
        "photometric": opts["augment_light"],
        "noise": opts["augment_noise"],
        "highlights": opts["augment_highlights"],
        "cache_features": not opts["no_cache"],
        "cache_dtype": opts["cache_dtype"],
        "checkpoint_every": opts["checkpoint_every"],
        "mode": opts["mode"],
        "alpha": opts["alpha"],
        "topk": opts["topk"],
    }
    runtime = {"device": opts["device"], "workers": opts["workers"], "progress": not opts["quiet"]}
    if opts["resume"]:  # options given again take effect; the others are the run's stored ones
        option = {
            "cache_features": "no_cache",
            "photometric": "augment_light",
            "noise": "augment_noise",
            "highlights": "augment_highlights",
        }
        changes = {k: v for k, v in values.items() if k in given or option.get(k) in given}
        plan = plans.resumed_run(out, changes | runtime, category)
    else:
        plan = plans.new_run(
            out,
            TrainConfig(**values, **runtime),
            category,
            overwrite=opts["overwrite"],
            init_from=opts["init_from"],
            preset=opts["preset"],
            weights=opts["weights"],
            input_size=parse_input_size(opts["input_size"]),
            stages=parse_stages(opts["stages"]),
            error_metric=opts["error_metric"],
            plus=plans.PlusSources(**{k: opts[k] for k in ("synthetic", "anomalies", "external")}),
        )
    cfg = plan.train
    feedback, record = feedbacks.for_run(feedback, out, resume=opts["resume"], init_from=plan.init_from, seed=cfg.seed)
    data = open_dataset(data_root, plan.category)
    extra_good = feedback.extra_good() if feedback else ((), ())
    if feedback is not None:
        feedbacks.check_no_leak(feedback, data)
        click.echo("\n".join([feedback.summary(), *feedback.review.skipped]), err=True)
    plus_data = {}
    if cfg.mode == "adtr+":
        sources = feedback.anomaly_sources() if feedback else []
        plus = plans.plus_training(data, plan, extra_good=extra_good[0], extra_sources=sources)
        plus_data = plus.train_kwargs()
        click.echo(
            f"ADTR+: {plus.good_images} good images + {plus.record['anomalies_per_epoch']} anomalies per epoch from "
            f"{', '.join(plus.record['sources'])}; the backbone runs on every batch (no feature cache)",
            err=True,
        )
    if record is not None:
        plus_data["extra_info"] = plus_data.get("extra_info", {}) | {"feedback": record}
    click.echo(
        f"{data.kind} data {data.root} category {data.category}: {len(data.train)} training images, "
        f"{len(data.test)} test images; {cfg.epochs} epochs on {cfg.device}",
        err=True,
    )
    try:
        ckpt_path = train(
            plan.model,
            cfg,
            data,
            out,
            resume=opts["resume"],
            evaluate=opts["do_eval"],
            init_from=None if opts["resume"] else plan.init_from,
            tiling=plans.tiling_for(opts["tile"], plan, out, resume=opts["resume"]),
            extra_good=extra_good,
            **plus_data,
        )
    except KeyboardInterrupt as exc:
        click.echo(f"\n{exc or 'training interrupted; the last complete checkpoint is kept'}", err=True)
        raise SystemExit(130) from None
    _report(ckpt_path)
    return ckpt_path


def _given(ctx: click.Context, opts: dict) -> set[str]:
    """The options (parameter names) given on the command line, as opposed to defaults."""
    return {k for k in opts if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}


def _child_args(ctx: click.Context, **overrides) -> list[str]:
    """The options given on this command line (plus `overrides`, by parameter name) as arguments for a child
    `adtr-train`, without the launcher options --nproc and --devices."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or name in ("nproc", "devices"):
            continue
        if name in overrides:
            value = overrides[name]
        elif ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            value = ctx.params[name]
        else:
            continue
        if value is None:
            continue
        if param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


def _launch_torchrun(ctx: click.Context, nproc: int) -> int:
    """Run this command in `nproc` DDP processes via torchrun (python -m torch.distributed.run) on 127.0.0.1 with a
    free port; returns its exit code."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port (the OS picks it; released just before torchrun binds it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "adtr_deploy.train", *_child_args(ctx),
    ]  # fmt: skip
    click.echo(f"launching {nproc} processes: {' '.join(cmd[1:])}", err=True)
    return subprocess.run(cmd).returncode


def _report(ckpt_path) -> None:
    from adtr_deploy.model.checkpoint import read_checkpoint
    from adtr_deploy.train.distributed import is_main

    if not is_main():  # one report per run, from rank 0
        return

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

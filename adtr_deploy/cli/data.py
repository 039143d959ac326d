"""`adtr data`: write the built-in demo data set (`adtr data demo`) and summarize MVTec-AD folders (`adtr data info`).

Imports nothing heavy at module level: `adtr --help` stays torch-free. scikit-image is imported only by `demo`.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from adtr_deploy.cli.common import CONTEXT, user_errors
from adtr_deploy.errors import UserError


def _category_dirs(root: Path) -> list[Path]:
    """Category folders under an MVTec-AD root (those with train/ or test/); ROOT itself if it is one category."""
    if (root / "train").is_dir() or (root / "test").is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))


def summarize_category(folder: str | Path) -> dict:
    """Counts of one MVTec-AD category folder: {"train": n, "test": {name: n}, "masks": {defect: [found, images]}}."""
    from adtr_deploy.data.mvtec import find_mask, image_files

    folder = Path(folder)
    train = folder / "train" / "good"
    summary: dict = {"train": len(image_files(train)) if train.is_dir() else 0, "test": {}, "masks": {}}
    test = folder / "test"
    for sub in sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []:
        images = image_files(sub)
        summary["test"][sub.name] = len(images)
        if sub.name != "good":
            found = sum(find_mask(folder.parent, folder.name, sub.name, img) is not None for img in images)
            summary["masks"][sub.name] = [found, len(images)]
    return summary


def format_summary(name: str, summary: dict) -> list[str]:
    lines = [f"{name}", f"  {'train/good':<22}{summary['train']:>5}"]
    for split, n in summary["test"].items():
        line = f"  {'test/' + split:<22}{n:>5}"
        if split in summary["masks"]:
            found, total = summary["masks"][split]
            line += f"   masks {found}/{total}"
            if found == 0 and total:
                line += " (no ground truth: image metrics only)"
            elif found < total:
                line += f" ({total - found} missing: those images are left out of pixel metrics)"
        lines.append(line)
    if summary["train"] == 0:
        lines.append("  warning: no training images in train/good")
    return lines


@click.group(name="data", context_settings=CONTEXT)
def command() -> None:
    """Data sets: write the built-in demo data set, or summarize an MVTec-AD folder."""


@command.command("demo", context_settings=CONTEXT)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to write the data set into.")
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives byte-identical files.")
@click.option(
    "--categories",
    default="brick,grass,gravel",
    show_default=True,
    help="Comma-separated categories to write: the demo's brick, grass, gravel, or the second evaluation set's moon, "
    "stars, tissue (other real photographs, for checking a model on textures it was not tuned on).",
)
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="Side of the square images in pixels [default: 256; 1024 with --large].",
)
@click.option(
    "--large",
    is_flag=True,
    help="Write the large-image set instead: 1024-pixel images (the photographs at 2x) with small defects (scratches, "
    "pinholes, small stains, 3-24 px) and exact masks, 32 train/good, 16 test/good and 12 per defect type, and "
    "defect_sizes.json; for tiled training (adtr-train --tile). Default category: brick.",
)
@click.option(
    "--preview",
    type=click.Path(path_type=Path),
    default=None,
    help="Also save a PNG grid with one example per defect type and its mask.",
)
@user_errors
def demo(out: Path, seed: int, categories: str, image_size: int | None, large: bool, preview: Path | None) -> None:
    """Write the built-in demo data set (real texture photos with synthesized defects) in the MVTec-AD layout.

    Each category has 80 train/good, 20 test/good and 10 test images per defect type (patch, scratch, stain, hole) with
    exact masks in ground_truth/. A category already written with the same settings is kept as it is.
    """
    from adtr_deploy.data.demo import write_demo_dataset, write_preview

    names = [c.strip() for c in categories.split(",") if c.strip()]
    start = time.perf_counter()
    if large:
        from adtr_deploy.data.demo_large import write_large_dataset

        names = (
            names if click.get_current_context().get_parameter_source("categories").name == "COMMANDLINE" else ["brick"]
        )
        root = write_large_dataset(out, names, seed=seed, size=image_size or 1024)
        click.echo(f"Large-image demo set in {root} ({time.perf_counter() - start:.1f} s, seed {seed}):")
        for name in names:
            click.echo("\n".join(format_summary(name, summarize_category(root / name))))
        click.echo(
            f"Train on tiles: adtr train --data {root} --category {names[0]} --out runs/{names[0]}-tiled --tile native"
        )
        return
    image_size = image_size or 256
    root = write_demo_dataset(out, names, seed=seed, image_size=image_size)
    click.echo(
        f"Demo data set in {root} ({time.perf_counter() - start:.1f} s, seed {seed}, {image_size}x{image_size}):"
    )
    for name in names:
        click.echo("\n".join(format_summary(name, summarize_category(root / name))))
    if preview is not None:
        click.echo(f"Preview: {write_preview(preview, names, seed=seed)}")
    click.echo(f"Train on it: adtr train --data {root} --category {names[0]} --out runs/{names[0]}")


@command.command("info", context_settings=CONTEXT)
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--category", default=None, help="Summarize only this category.")
@user_errors
def info(root: Path, category: str | None) -> None:
    """Summarize an MVTec-AD layout folder ROOT: image counts per split and defect, and which masks exist."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the data set root (ROOT/NAME/train/good ...)")
    folders = _category_dirs(root)
    if category is not None:
        folders = [f for f in folders if f.name == category]
        if not folders:
            found = ", ".join(f.name for f in _category_dirs(root)) or "none"
            raise UserError(f"category {category!r} is not in {root} (categories there: {found}); check --category")
    if not folders:
        raise UserError(
            f"{root} holds no MVTec-AD category folder (NAME/train/good, NAME/test/...); "
            "point at the data set root, or write the demo set with `adtr data demo --out ROOT`"
        )
    totals = [0, 0]
    for folder in folders:
        summary = summarize_category(folder)
        click.echo("\n".join(format_summary(folder.name, summary)))
        totals[0] += summary["train"]
        totals[1] += sum(summary["test"].values())
    click.echo(
        f"{len(folders)} categor{'y' if len(folders) == 1 else 'ies'}: {totals[0]} train, {totals[1]} test images"
    )

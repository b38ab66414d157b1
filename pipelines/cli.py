"""The ``selftrain`` command. Thin: parse, call one library function, print."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pipelines import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="selftrain: multi-round self-training of segmentation models.")
data_app = typer.Typer(no_args_is_help=True, help="Generate, import, version, push, pull and inspect datasets.")
import_app = typer.Typer(no_args_is_help=True, help="Import real data into WebDataset shards.")
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")
out = Console()
err = Console(stderr=True)

DEFAULT_DATA = Path("data/partworld-demo")


def _fail(e: Exception) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _known_errors() -> tuple[type[Exception], ...]:
    from pipelines.dvc import DvcError
    from contract.spec import SpecError

    from pipelines.runner import PipelineError

    errs: list[type[Exception]] = [DvcError, SpecError, PipelineError, FileNotFoundError, ValueError]
    try:
        from trainers.data.shards import DataError

        errs.append(DataError)
    except ImportError:
        pass
    return tuple(errs)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _known_errors() as e:
        _fail(e)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        out.print(f"selftrain {__version__}")
        raise typer.Exit()


def _track_target(path: Path) -> Path:
    """Source datasets live under ./data, tracked as a whole by data.dvc; anything else is tracked on its own."""
    p = path.resolve()
    data_root = (Path.cwd() / "data").resolve()
    return data_root if data_root in p.parents else p


@data_app.command("generate")
def data_generate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="PartWorld config YAML (default: the embedded demo config)."),
    output: Path = typer.Option(DEFAULT_DATA, "--out", "-o", help="Dataset directory (gets train/, eval/ and val/)."),
    shard_size: int = typer.Option(500, help="Samples per shard."),
    limit: Optional[int] = typer.Option(None, help="At most this many images per split."),
    version: bool = typer.Option(True, "--version/--no-version", help="Track the result with DVC (data.dvc for ./data)."),
    push: bool = typer.Option(True, "--push/--no-push", help="Push the new version to the DVC remote."),
) -> None:
    """Generate the built-in PartWorld dataset as shards and version it with DVC."""
    from pipelines import data

    if version:  # a path DVC cannot track fails before anything is generated
        _guard(data.versioning_root, _track_target(output), Path.cwd())
    idx = _guard(data.generate_partworld, output, config, shard_size=shard_size, limit=limit)
    for split, i in idx.items():
        out.print(f"{split}: {i.num_samples} samples in {len(i.shards)} shard(s) -> {output / split}")
    if version:
        target = _track_target(output)
        v = _guard(data.version, target, Path.cwd(), None, push)
        out.print(f"version {v.md5} ({v.nfiles} files, {v.size} bytes) tracked by {Path(v.dvc_file).name}" + (" and pushed" if push else ""))


@data_app.command("version")
def data_version(
    path: Path = typer.Argument(..., help="Dataset directory to track."),
    push: bool = typer.Option(False, "--push", help="Push it to the DVC remote too."),
) -> None:
    """Track a dataset directory with DVC and print its version hash."""
    from pipelines import data

    v = _guard(data.version, path, None, None, push)
    out.print(f"{v.md5}  {path}")


@data_app.command("push")
def data_push(paths: list[Path] = typer.Argument(None, help="Tracked directories (default: data)."), remote: Optional[str] = typer.Option(None, "-r", "--remote")) -> None:
    """Upload tracked datasets to the DVC remote."""
    from pipelines import dvc

    targets = paths or [Path("data")]
    _guard(dvc.push, targets, None, remote)
    out.print(f"pushed {', '.join(map(str, targets))}")


@data_app.command("pull")
def data_pull(paths: list[Path] = typer.Argument(None, help="Tracked directories (default: data)."), remote: Optional[str] = typer.Option(None, "-r", "--remote")) -> None:
    """Download tracked datasets from the DVC remote and check them out."""
    from pipelines import dvc

    targets = paths or [Path("data")]
    _guard(dvc.pull, targets, None, remote)
    out.print(f"pulled {', '.join(map(str, targets))}")


@data_app.command("checkout")
def data_checkout(
    md5: str = typer.Argument(..., help="Version hash (<md5>.dir) as logged in MLflow or a .dvc file."),
    output: Path = typer.Option(..., "--out", "-o", help="Empty directory to materialise the version in."),
    remote: Optional[str] = typer.Option(None, "-r", "--remote"),
) -> None:
    """Reproduce any dataset version by its hash (byte-identical shards)."""
    from pipelines import dvc

    v = _guard(dvc.checkout_version, md5, output, None, remote)
    out.print(f"{v.md5} -> {output} ({v.nfiles} files)")


@data_app.command("hash")
def data_hash(path: Path) -> None:
    """Print the DVC hash a directory would have (nothing is written)."""
    from pipelines import dvc

    out.print(_guard(dvc.dataset_hash, path))


@data_app.command("verify")
def data_verify(path: Path) -> None:
    """Check every shard against the checksums in index.json."""
    from trainers.data import shards

    idx = _guard(shards.verify, path)
    out.print(f"ok: {path} ({idx.num_samples} samples, {len(idx.shards)} shards)")


@data_app.command("show")
def data_show(
    path: Path = typer.Argument(..., help="Dataset split directory (holds index.json)."),
    output: Path = typer.Option(Path("contact-sheet.png"), "--out", "-o"),
    n: int = typer.Option(16, "-n", help="Number of samples."),
    cols: int = typer.Option(4, help="Columns."),
) -> None:
    """Write a contact sheet PNG of samples with instance overlays (and part overlays for evaluation splits)."""
    from pipelines import data

    png = _guard(data.show, path, output, n, cols)
    out.print(f"wrote {png}")


def _report_import(idx, output: Path) -> None:
    out.print(f"{idx.num_samples} samples in {len(idx.shards)} shard(s) -> {output}")
    rep = idx.notes.get("import") or {}
    if rep.get("clipped_polygons"):
        err.print(f"[yellow]{rep['clipped_polygons']} polygon(s) in {rep['clipped_annotations']} annotation(s) overshot the "
                  f"image (by up to {rep['max_overshoot_px']:g} px) and were clipped to it[/] (counted in {output / 'index.json'})",
                  highlight=False)
    if "parts_dropped" in rep:
        out.print(f"training split: {rep['parts_dropped']} part annotation(s) dropped; objects from "
                  f"{idx.notes.get('objects_from')}; no part labels in the shards")
    if idx.quarantined:
        err.print(f"[yellow]{len(idx.quarantined)} sample(s) quarantined[/] (listed in {output / 'index.json'}):")
        for q in idx.quarantined[:10]:
            err.print(f"  {q.get('source')} [{q.get('key')}]: {q.get('error')}", highlight=False)
    out.print(f"next: selftrain data version {output} --push")


@import_app.command("folder")
def import_folder(
    images: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    output: Path = typer.Option(..., "--out", "-o", help="Dataset directory to write."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Quarantine unreadable images (listed in the index) instead of failing."),
) -> None:
    """Image folder -> unlabelled shards."""
    from pipelines import data

    _report_import(_guard(data.import_folder, images, output, shard_size=shard_size, skip_bad=skip_bad), output)


@import_app.command("coco")
def import_coco(
    instances: Path = typer.Argument(..., help="COCO instance JSON."),
    images: Path = typer.Option(..., "--images", help="Image directory the JSON's file_name entries are relative to."),
    output: Path = typer.Option(..., "--out", "-o"),
    split: str = typer.Option("train", help="Split name recorded in the index."),
    shard_size: int = typer.Option(1000),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Quarantine bad samples instead of failing."),
) -> None:
    """COCO instance JSON + images -> shards with object labels."""
    from pipelines import data

    _report_import(_guard(data.import_coco, instances, images, output, split=split, shard_size=shard_size, skip_bad=skip_bad), output)


@import_app.command("imagenet-s")
def import_imagenet_s(
    labels: Path = typer.Argument(..., help="Label folder (e.g. validation-segmentation/): <wnid>/<name>.png, id = R + 256 G."),
    images: Path = typer.Option(..., "--images", help="Image folder mirroring it (e.g. validation/): <wnid>/<name>.JPEG."),
    categories: Path = typer.Option(..., "--categories", help="Category list (e.g. ImageNetS_categories_im50.txt): line i is id i."),
    output: Path = typer.Option(..., "--out", "-o"),
    split: str = typer.Option("validation", help="Split name recorded in the index."),
    shard_size: int = typer.Option(1000),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Quarantine bad label maps (ids outside the list, no image) instead of failing."),
) -> None:
    """ImageNet-S label maps (0 other, 1000 ignore) + images -> shards with one object per category (LUSS evaluation data)."""
    from trainers.data import imagenet_s

    _report_import(_guard(imagenet_s.import_imagenet_s, labels, images, categories, output, split=split,
                          shard_size=shard_size, skip_bad=skip_bad), output)


@import_app.command("panoptic")
def import_panoptic(
    panoptic: Path = typer.Argument(..., help="COCO panoptic JSON (images, annotations with segments_info, categories with isthing)."),
    png_dir: Path = typer.Option(..., "--png-dir", help="Folder of the panoptic PNGs the annotations' file_name entries name (id = R + 256 G + 256^2 B)."),
    images: Path = typer.Option(..., "--images", help="Image directory the JSON's images file_name entries are relative to."),
    output: Path = typer.Option(..., "--out", "-o"),
    split: str = typer.Option("train", help="Split name recorded in the index."),
    shard_size: int = typer.Option(1000),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Quarantine bad samples (a PNG whose segment ids disagree with its JSON, ...) instead of failing."),
) -> None:
    """COCO panoptic JSON + PNGs + images -> shards with things (objects) and stuff regions (stuff), for CaSP's entity labels."""
    from trainers.data import panoptic as panoptic_io

    idx = _guard(panoptic_io.import_panoptic, panoptic, png_dir, images, output, split=split, shard_size=shard_size,
                 skip_bad=skip_bad)
    rep = idx.notes.get("import") or {}
    out.print(f"{rep.get('things', 0)} thing and {rep.get('stuff', 0)} stuff segment(s) ({rep.get('crowd', 0)} crowd)")
    _report_import(idx, output)


@import_app.command("parts")
def import_parts(
    parts: Path = typer.Argument(..., help="PartImageNet-style COCO part JSON."),
    images: Path = typer.Option(..., "--images"),
    output: Path = typer.Option(..., "--out", "-o"),
    instances: Optional[Path] = typer.Option(None, "--instances", help="Instance JSON with object masks (default: union of each image's parts)."),
    object_class: Optional[str] = typer.Option(None, "--object-class", help="Object class of every part (default: the part category's supercategory; 'object' if none has one)."),
    as_training: bool = typer.Option(False, "--as-training", help="Write an object-labelled training split: objects only, no part labels in the shards."),
    objects_from: str = typer.Option("union", "--objects", help="Without --instances, objects are the 'union' of an image's parts per object class, or its 'components' (8-connected)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split name recorded in the index (default: eval, or train with --as-training)."),
    shard_size: int = typer.Option(1000),
    skip_bad: bool = typer.Option(False, "--skip-bad"),
) -> None:
    """PartImageNet-style part JSON -> evaluation shards, or with --as-training an object-labelled training split (parts are never visible to training stages)."""
    from pipelines import data

    idx = _guard(data.import_parts, parts, images, output, instances_json=instances, object_class=object_class,
                 split=split, as_training=as_training, objects_from=objects_from, shard_size=shard_size, skip_bad=skip_bad)
    _report_import(idx, output)


def _names(values: Optional[list[str]]) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


@data_app.command("split")
def data_split(
    path: Path = typer.Argument(..., help="Dataset directory to split (holds index.json)."),
    fractions: str = typer.Option(..., "--fractions", "-f", help="NAME=FRACTION,... adding up to 1, e.g. val=0.1,train=0.9."),
    output: Path = typer.Option(..., "--out", "-o", help="Directory that gets one dataset per split: <out>/<name>/."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the assignment: the same seed gives byte-identical splits."),
    keep_parts: Optional[list[str]] = typer.Option(None, "--keep-parts", help="Splits that keep part labels (evaluation/selection), e.g. val,eval; all others lose them."),
    strip_labels: Optional[list[str]] = typer.Option(None, "--strip-labels", help="Splits that keep images only (no objects, parts or proposals), e.g. unlabeled."),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name prefix (default: the source's); datasets are <name>-<split>."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
) -> None:
    """Split a dataset by seeded fractions into new datasets (disjoint, complete, deterministic)."""
    from pipelines import data

    idx = _guard(data.split, path, output, fractions, seed=seed, keep_parts=_names(keep_parts),
                 strip_labels=_names(strip_labels), name=name, shard_size=shard_size)
    for s, i in idx.items():
        what = "images only" if i.notes["split"]["strip_labels"] else ("with parts" if i.has_parts else "objects, no parts")
        out.print(f"{s}: {i.num_samples} samples ({what}) -> {output / s}")
        missing = i.notes.get("categories_without_objects") or []
        if missing:
            names = ", ".join(f"{c['name']} (id {c['id']})" for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            out.print(f"[yellow]warning[/yellow]: {s} has no object of {len(missing)} class(es): {names}; a class-specific "
                      "model trained on it never sees them (raise its fraction or change --seed)")
    out.print(f"next: selftrain data version {output} --push")


@data_app.command("export")
def data_export(
    path: Path = typer.Argument(..., help="Dataset directory."),
    output: Path = typer.Option(..., "--out", "-o", help="COCO JSON to write."),
    kind: str = typer.Option("objects", help="objects or parts."),
) -> None:
    """Export instance or part labels back to COCO JSON."""
    from pipelines import data

    coco = _guard(data.export, path, output, kind)
    out.print(f"wrote {output}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")


DEFAULT_PIPELINE = Path("configs/partdistillation-demo.yaml")


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(DEFAULT_PIPELINE, help="Pipeline config YAML."),
    run: Optional[str] = typer.Option(None, "--run", help="Run name; re-using one resumes it (finished stages are skipped)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Override executor.kind: local, kubernetes or render."),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", min=1,
                                               help="Stages run side by side when their inputs are ready (default: what the machine holds; kubernetes: 8)."),
) -> None:
    """Run a pipeline (default: PartDistillation on the built-in demo dataset, embedded defaults).

    Stages run in dependency order; each is a job complete in itself (resolves its inputs, trains,
    versions its output dataset, registers its model, promotes), the same as the manifests `selftrain render` writes.
    """
    from pipelines import runner

    def echo(line: str) -> None:  # stage names in brackets are text, not rich markup
        out.print(line, markup=False, highlight=False, soft_wrap=True)

    result = _guard(runner.run_pipeline_cli, config, run, executor, echo, max_parallel)
    if isinstance(result, list):
        out.print(f"wrote {len(result)} manifest(s); apply them in order with kubectl apply -f <file>")
        return
    echo(result.summary)


@app.command("render")
def render_cmd(
    config: Path = typer.Argument(DEFAULT_PIPELINE, help="Pipeline config YAML."),
    output: Path = typer.Option(Path("manifests/pipeline"), "--out", "-o", help="Folder for the numbered stage manifests."),
    run: str = typer.Option("demo", "--run", help="Run name the manifests belong to."),
) -> None:
    """Write the pipeline's stages as numbered PyTorchJob manifests (and a README of their order) for kubectl apply."""
    from pipelines import render

    paths = _guard(render.render_pipeline, config, output, run)
    for p in paths:
        out.print(str(p))


@app.command("predict")
def predict_cmd(
    model: str = typer.Argument(..., help="models:/<name>@<alias>, models:/<name>/<version> or a model file."),
    dataset: Path = typer.Argument(..., help="Dataset directory (holds index.json) to predict on."),
    output: Path = typer.Option(..., "--out", "-o", help="Folder for the COCO results files (the layout of the model's evaluating stage)."),
    config: Optional[Path] = typer.Option(DEFAULT_PIPELINE, "--config", "-c", help="Pipeline config whose MLflow registry resolves models:/ URIs."),
    instance_teacher: Optional[str] = typer.Option(None, "--instance-teacher", help="A part ranker is also conditioned on this model's detections (setting pred)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Keep at most this many predictions per image (default: the model's own)."),
    min_size: Optional[int] = typer.Option(None, "--min-size", min=1, help="The model sees each image with its shorter side at this size, as the stages' min_size param; predictions come back at the dataset's resolution."),
    max_size: Optional[int] = typer.Option(None, "--max-size", min=1, help="...and its longer side at most this (the stages' max_size param)."),
    pixel_assignment: str = typer.Option("soft", "--pixel-assignment", help="A part ranker's cluster map: soft (every object pixel to its likeliest part) or mask (binary masks; pixels none covers unassigned), as evaluate-parts' param."),
) -> None:
    """A registered model's predictions on a dataset as COCO results files (RLE masks, scores; parts: object class, cluster)."""
    from pipelines.partdistillation import predict

    if pixel_assignment not in ("soft", "mask"):
        raise typer.BadParameter(f"{pixel_assignment!r}: soft or mask", param_hint="--pixel-assignment")
    for path in _guard(predict.predict, model, dataset, output, config, instance_teacher, top_k, min_size, max_size,
                       pixel_assignment).values():
        out.print(f"wrote {path}", soft_wrap=True, highlight=False)


purity_app = typer.Typer(no_args_is_help=True, help="Purity evaluation by manual rating (PartDistillation sec. 5.2, Fig. 4).")
app.add_typer(purity_app, name="purity")


@purity_app.command("grids")
def purity_grids(
    labels: Path = typer.Argument(..., help="Labels dataset (proposals with cluster ids: rank-parts, cluster-pixels) or a predictions folder (evaluate-parts' output, selftrain predict of a part ranker)."),
    output: Path = typer.Option(..., "--out", "-o", help="Folder for the grids, index.html and ratings-template.csv."),
    max_classes: Optional[int] = typer.Option(None, "--max-classes", help="Rate a seeded random subset of this many object classes."),
    seed: int = typer.Option(0, help="Seed of the instance and class sampling."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="With a predictions folder: the dataset it was predicted on (its images)."),
    setting: str = typer.Option("gt", "--setting", help="With a predictions folder: gt (conditioned on the dataset's objects) or pred (on detections)."),
    max_part_fraction: Optional[float] = typer.Option(0.5, "--max-part-fraction", help="Leave out parts larger than this share of their object (sec. 5.4: 0.5)."),
) -> None:
    """Write a 3x3 purity grid per (object class, part cluster) and an HTML page to browse and rate them."""
    from pipelines import purity

    page = _guard(purity.grids, labels, output, max_classes, seed, dataset, setting, max_part_fraction)
    out.print(f"wrote {page}")


@purity_app.command("curve")
def purity_curve(
    ratings: list[Path] = typer.Argument(..., help="Ratings CSV files (object_class,cluster,rating), one per method."),
    output: Path = typer.Option(Path("purity-curve.png"), "--out", "-o", help="PNG of the precision-vs-rating curves."),
    name: Optional[list[str]] = typer.Option(None, "--name", help="Method name per ratings file, in order (default: file stem)."),
) -> None:
    """Plot precision vs purity rating (fraction of parts rated >= r) for one or more methods, like Fig. 4."""
    from pipelines import purity

    curves = _guard(purity.curve, ratings, output, name)
    for method, c in curves.items():
        out.print(f"{method}: " + "  ".join(f">={r}: {v:.3f}" for r, v in c.items()), soft_wrap=True)
    out.print(f"wrote {output}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

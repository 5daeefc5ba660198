"""clip-density-index command line: a thin layer over the ``indexer`` and ``queries`` Python API.

Heavy libraries (faiss, duckdb, torch) are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from indexer.errors import ClipIndexError

SOURCES = ("synthetic", "open_clip", "datacomp", "clip-retrieval")


class Cli(click.Group):
    """Turns the library's domain errors into one clear line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClipIndexError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


class MemoryType(click.ParamType):
    """A byte size such as 4G, 512M or 1.5GB."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from indexer.choose import parse_memory

        try:
            return parse_memory(value)
        except ClipIndexError as e:
            self.fail(str(e), param, ctx)


def _progress(quiet: bool):
    from indexer.progress import null_progress, tqdm_progress

    return null_progress if quiet else tqdm_progress()


def _echo_kv(title: str, items: dict, indent: int = 2) -> None:
    click.echo(title)
    width = max((len(k) for k in items), default=0)
    for k, v in items.items():
        click.echo(f"{' ' * indent}{k:<{width}}  {v}")


index_dir_argument = click.argument(
    "index_dir", type=click.Path(file_okay=False, path_type=Path), default="index", required=False
)


@click.group(cls=Cli)
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) on stderr.")
@click.version_option(package_name="clip-density-index")
def cli(verbose: int) -> None:
    """clip-density-index: a CLIP-like model as a density-ratio estimator for a whole image-text pool.

    Build a FAISS + DuckDB index of a pool, score every sample (KL informativeness, conformity,
    likelihood, CLIPScore), then rank, select and weight samples with SQL.
    """
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command("build-index")
@click.option("--source", type=click.Choice(SOURCES), default="synthetic", show_default=True,
              help="Where the pool comes from. 'synthetic' is the built-in synthetic CLIP-like world.")
@click.option("--input", "input_path", type=click.Path(exists=True, path_type=Path),
              help="Input: DataComp metadata dir, clip-retrieval embeddings dir, or (open_clip) an "
                   "image folder / .tar shard(s).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("index"),
              show_default=True, help="Index directory to write (replaced only when the build succeeds).")
@click.option("--n", "n", type=click.IntRange(min=1), default=None,
              help="Pool size for --source synthetic (default 100000); for other sources, keep only "
                   "the first N samples.")
@click.option("--arch", type=click.Choice(["b32", "l14"]), default="b32", show_default=True,
              help="DataComp embedding arrays to use (b32_* or l14_*).")
@click.option("--logit-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Logit scale a for precomputed embeddings (default 100; open_clip reads the model's).")
@click.option("--model", default="ViT-B-32", show_default=True, help="open_clip model name.")
@click.option("--pretrained", default=None,
              help="open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint path.")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="open_clip: captions file (CSV, TSV, JSONL or parquet) for an image folder.")
@click.option("--image-column", default="image", show_default=True, help="Captions file: image path column.")
@click.option("--caption-column", default="caption", show_default=True, help="Caption column name.")
@click.option("--uid-column", default=None, help="Column holding 32-hex uids (default: derived).")
@click.option("--skip-bad", is_flag=True, help="open_clip: skip unreadable images, count and list them.")
@click.option("--device", default="auto", show_default=True, help="open_clip: torch device.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="open_clip: DataLoader workers.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (synthetic world, FAISS training).")
@click.option("--dim", type=click.IntRange(min=2), default=512, show_default=True,
              help="Embedding dimension of the synthetic world.")
@click.option("--geometry", type=click.Choice(["calibrated", "flat", "clustered"]), default="calibrated",
              show_default=True, help="Synthetic world geometry.")
@click.option("--index-factory", default=None,
              help="FAISS factory string (e.g. Flat, IVF1024,Flat, IVF4096,PQ64); overrides the choice.")
@click.option("--max-memory", type=MemoryType(), default="8G", show_default=True,
              help="Memory budget for one modality's FAISS index; picks the index type.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Default IVF probes stored with the index.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage type of the normalised embeddings kept for exact rescoring.")
@click.option("--batch-size", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Rows per batch read from the source.")
@click.option("--gpu/--no-gpu", default=None, help="Use GPU FAISS (default: when a GPU is present).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def build_index_cmd(source, input_path, out, n, arch, logit_scale, model, pretrained, captions, image_column,
                    caption_column, uid_column, skip_bad, device, workers, seed, dim, geometry, index_factory,
                    max_memory, nprobe, dtype, batch_size, gpu, quiet):
    """Build a FAISS + DuckDB index of a pool.

    \b
    Examples:
      python cli.py build-index                         # 100k-sample synthetic world -> ./index
      python cli.py build-index --n 20000 --out small
      python cli.py build-index --source datacomp --input metadata/ --arch l14 --out dc
      python cli.py build-index --source clip-retrieval --input embeddings/ --out cr
      python cli.py build-index --source open_clip --input images/ --captions caps.csv \\
          --model ViT-B-32 --pretrained laion2b_s34b_b79k --out mine
    """
    from indexer.build import build_index
    from indexer.sources import make_source

    progress = _progress(quiet)
    if source != "synthetic" and input_path is None:
        raise click.UsageError(f"--input is required with --source {source}")
    if source == "synthetic" and input_path is not None:
        raise click.UsageError("--input cannot be used with --source synthetic")
    src = make_source(
        source, input_path, n=n, arch=arch, logit_scale=logit_scale, model=model, pretrained=pretrained,
        captions=captions, image_column=image_column, caption_column=caption_column, uid_column=uid_column,
        skip_bad=skip_bad, device=device, workers=workers, seed=seed, dim=dim, geometry=geometry,
        progress=progress,
    )
    report = build_index(
        src, out, index_key=index_factory, max_memory=max_memory, nprobe=nprobe, dtype=dtype,
        batch_size=batch_size, use_gpu=gpu, limit=n if source != "synthetic" else None, seed=seed,
        progress=progress,
    )
    label = " (SYNTHETIC data: the built-in synthetic CLIP-like world)" if report.synthetic else ""
    click.echo(f"Built {report.path}: {report.n:,} samples, dim {report.dim}, source {report.source}{label}")
    click.echo(f"  FAISS: {', '.join(f'{m} {k}' for m, k in report.index_keys.items())}")
    click.echo("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
               + f" (total {report.total_seconds:.1f}s, {report.n / max(report.total_seconds, 1e-9):,.0f} samples/s)")
    if report.skipped:
        click.echo(f"  skipped {report.skipped} unreadable inputs, listed in {report.skipped_report}", err=True)


@cli.command("info")
@index_dir_argument
@click.option("--json", "as_json", is_flag=True, help="Print the whole summary as JSON.")
def info_cmd(index_dir, as_json):
    """Print an index's manifest, table counts and statistics summary.

    \b
    Example:
      python cli.py info index
    """
    from indexer.info import index_info

    info = index_info(index_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    m = info["manifest"]
    if m["synthetic"]:
        click.echo("SYNTHETIC DATA: this index holds the built-in synthetic CLIP-like world, not real data.")
    _echo_kv(f"Index {info['path']}", {k: v for k, v in m.items()})
    _echo_kv("Tables (rows)", info["tables"])
    _echo_kv("Files (bytes)", {k: f"{v:,}" for k, v in info["files"].items()})
    for modality, s in info["stats"].items():
        _echo_kv(f"Statistics: {modality}", {k: f"{v:.4f}" for k, v in s.items()})
    if info["last_score_run"]:
        _echo_kv("Last score run", info["last_score_run"])


if __name__ == "__main__":
    cli()

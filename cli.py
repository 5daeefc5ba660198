"""clip-density-index command line: a thin layer over the ``indexer`` and ``queries`` Python API.

Heavy libraries (faiss, duckdb, torch) are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from clip_density_index.indexer import defaults
from clip_density_index.indexer.engine import ENGINES
from clip_density_index.indexer.errors import ClipIndexError, ParameterClash
from clip_density_index.indexer.sources import ALIASES, OPTION_DEFAULTS, RANDOM_WEIGHTS, SOURCES, check_options
from clip_density_index.indexer.synthetic import GEOMETRIES

#: Seeds are what numpy's generators and DuckDB's BIGINT columns take.
SEED = click.IntRange(min=0, max=2**63 - 1)
#: build-index options that only some sources read (``indexer.sources.SOURCES`` says which).
SOURCE_OPTIONS = (*OPTION_DEFAULTS, *ALIASES)

#: Library parameters whose option has another name; every other parameter is set by the option of
#: its own name (``top_fraction`` by ``--top-fraction``).
RENAMED = {"index_key": "index_factory"}


def flag(ctx: click.Context | None, param: str) -> str:
    """How the command of ``ctx`` spells the library parameter ``param``: its option's long flag
    (``--top-fraction``, ``--input`` for ``input_path``), or the argument's name (``INDEX_DIR``)."""
    name = RENAMED.get(param, param)
    for p in ctx.command.params if ctx is not None else ():
        if p.name == name:
            if isinstance(p, click.Argument):
                return p.human_readable_name
            return next((o for o in p.opts if o.startswith("--")), p.opts[0])
    return "--" + name.replace("_", "-")


class Command(click.Command):
    """A command whose library errors are one line in its own terms (each parameter named by its
    flag): a clash of parameters is a usage error (exit code 2), any other ``ClipIndexError`` exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ParameterClash as e:
            raise click.UsageError(e.spelled(lambda p: flag(ctx, p)), ctx) from None
        except ClipIndexError as e:
            raise click.ClickException(e.spelled(lambda p: flag(ctx, p))) from None


class Cli(click.Group):
    """The command group: library errors as one line (see ``Command``), a last net for low-level
    errors, Ctrl-C as exit code 130."""

    command_class = Command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClipIndexError as e:  # raised outside a command's body (while its options are read)
            raise click.ClickException(e.spelled(lambda p: flag(None, p))) from None
        except click.exceptions.ClickException:
            raise
        except Exception as e:  # a last net under the library's own checks: a full disk, a damaged catalog
            clear = _low_level_error(e, ctx)
            if clear is None:
                raise
            raise clear from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


def _low_level_error(e: Exception, ctx: click.Context) -> click.ClickException | None:
    """A full disk or a catalog DuckDB finds damaged, wherever it surfaced, as one line; None for
    anything else (its traceback is a bug to report)."""
    from clip_density_index.indexer.diskspace import is_disk_full

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    command = ctx.invoked_subcommand or "the command"
    if is_disk_full(e):
        return click.ClickException(f"No space left on the device: {command} stopped ({first}); free some space "
                                    "and run it again")
    if type(e).__module__.split(".")[0] in ("duckdb", "_duckdb") and "corrupt" in text.lower():
        return click.ClickException(f"The index's catalog is damaged: {command} stopped ({first}); rebuild the "
                                    "index with `cli.py build-index`")
    return None


class MemoryType(click.ParamType):
    """A byte size such as 4G, 512M or 1.5GB."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from clip_density_index.indexer.choose import parse_memory

        try:
            return parse_memory(value)
        except ClipIndexError as e:
            self.fail(str(e), param, ctx)


class InputType(click.Path):
    """A path on this machine (that exists, with ``exists``), or a URI (s3://..., memory://...) kept
    as text: read or written through fsspec."""

    def __init__(self, exists: bool = True, **kwargs) -> None:
        super().__init__(exists=exists, path_type=Path, **kwargs)

    def convert(self, value, param, ctx):
        from clip_density_index.indexer.fs import is_uri

        if isinstance(value, str) and is_uri(value):
            return value
        return super().convert(value, param, ctx)


class IndexType(InputType):
    """An index directory, or the URI of an index published to an object store (s3://...). A URI's
    local mirror is brought up to date here, with a progress bar on stderr for what it downloads;
    the command then opens the URI from the mirror (``indexer.pool.open_index``)."""

    def __init__(self) -> None:
        super().__init__(exists=False, file_okay=False)

    def convert(self, value, param, ctx):
        from clip_density_index.indexer.progress import tqdm_progress
        from clip_density_index.indexer.remote import index_uri, mirror

        value = super().convert(value, param, ctx)
        uri = index_uri(value)
        if uri is None:
            return value
        mirror(uri, progress=tqdm_progress())
        return uri


def _logit_scale(a: float | None, log_a: float | None) -> float | None:
    """a from --logit-scale / --log-logit-scale; warns on stderr when a looks like the log form."""
    from clip_density_index.queries.conventions import log_like_warning, resolve_logit_scale

    warning = log_like_warning(a) if log_a is None else None
    if warning:
        click.echo(f"Warning: {warning}", err=True)
    return resolve_logit_scale(a, log_a)


def _progress(quiet: bool):
    from clip_density_index.indexer.progress import null_progress, tqdm_progress

    return null_progress if quiet else tqdm_progress()


def _note_synthetic(index_dir) -> None:
    """Label output from the built-in synthetic world, on stderr (keeps CSV / JSON output clean)."""
    from clip_density_index.indexer.errors import ClipIndexError
    from clip_density_index.indexer.pool import open_index

    try:
        synthetic = open_index(index_dir).synthetic
    except ClipIndexError:
        return  # the command itself reports the problem
    if synthetic:
        click.echo("[SYNTHETIC data: the built-in synthetic CLIP-like world, not a real pool]", err=True)


def _echo_kv(title: str, items: dict, indent: int = 2) -> None:
    """``title``, then one ``key  value`` line per item; a dict value (or its JSON text) becomes one
    line per entry (``key.entry``), a list a comma-separated line, a float 4 significant digits."""
    click.echo(title)
    flat: dict[str, str] = {}
    for k, v in items.items():
        if isinstance(v, str) and v.startswith("{"):
            try:
                v = json.loads(v)
            except ValueError:
                pass
        if isinstance(v, dict):
            for sub, value in v.items():
                flat[f"{k}.{sub}"] = _plain(value)
        else:
            flat[k] = _plain(v)
    width = max((len(k) for k in flat), default=0)
    for k, v in flat.items():
        click.echo(f"{' ' * indent}{k:<{width}}  {v}")


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_plain(v)}" for k, v in value.items())
    return str(value)


index_dir_argument = click.argument("index_dir", type=IndexType(), default=defaults.INDEX_DIR, required=False)


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
    # huggingface_hub prints through its own handler; through ours as well, every line came twice
    logging.getLogger("huggingface_hub").propagate = False
    # `kill` / `timeout` (SIGTERM) ends a command like Ctrl-C: a build removes its half-written
    # directory, a score keeps its finished chunks for the next run.
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


@cli.command("build-index")
@click.option("--source", type=click.Choice(list(SOURCES)), default=defaults.SOURCE, show_default=True,
              help="Where the pool comes from. 'synthetic' is the built-in synthetic CLIP-like world.")
@click.option("--input", "input_path", type=InputType(),
              help="Input of --source " + "; ".join(f"{k.name}: {k.input}" for k in SOURCES.values() if k.input)
                   + ". Precomputed embeddings may be a URI (s3://bucket/metadata, memory://...).")
@click.option("--out", type=InputType(exists=False, file_okay=False), default=Path(defaults.INDEX_DIR),
              show_default=True,
              help="Index directory to write (replaced only when the build succeeds), or a URI (s3://bucket/idx): "
                   "built in a local mirror folder, then published there.")
@click.option("--n", "n", type=click.IntRange(min=2), default=None,
              help=f"Pool size for --source synthetic (default {defaults.SYNTHETIC_N}); for other sources, keep "
                   "only the first N samples.")
@click.option("--arch", type=click.Choice(["b32", "l14"]), default=defaults.DATACOMP_ARCH, show_default=True,
              help="DataComp embedding arrays to use (b32_* or l14_*).")
@click.option("--logit-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Logit scale a for precomputed embeddings (default {defaults.LOGIT_SCALE:g}; open_clip reads "
                   "the model's). a itself, not its log: a value <= 7 is taken as a, with a warning.")
@click.option("--log-logit-scale", type=float, default=None,
              help="The logit scale in log form (as the paper's DataComp code takes it: 4.6052 = log 100).")
@click.option("--model", default=defaults.OPEN_CLIP_MODEL, show_default=True, help="open_clip model name.")
@click.option("--pretrained", default=None,
              help="open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint path; required "
                   f"with --source open_clip ('{RANDOM_WEIGHTS}': untrained weights, for tests only).")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="open_clip: captions file (CSV, TSV, JSONL or parquet) for an image folder.")
@click.option("--image-column", default=defaults.IMAGE_COLUMN, show_default=True,
              help="Captions file: image path column.")
@click.option("--caption-column", default=defaults.CAPTION_COLUMN, show_default=True, help="Caption column name.")
@click.option("--uid-column", default=None, help="Column holding 32-hex uids (default: derived).")
@click.option("--skip-bad", is_flag=True, help="open_clip: skip unreadable images, count and list them.")
@click.option("--device", default=defaults.DEVICE, show_default=True, help="open_clip: torch device.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="open_clip: DataLoader workers.")
@click.option("--seed", type=SEED, default=defaults.SEED, show_default=True,
              help="Seed (synthetic world, FAISS training).")
@click.option("--dim", type=click.IntRange(min=2), default=defaults.SYNTHETIC_DIM, show_default=True,
              help="Embedding dimension of the synthetic world.")
@click.option("--geometry", type=click.Choice(GEOMETRIES), default=defaults.SYNTHETIC_GEOMETRY,
              show_default=True, help="Synthetic world geometry: calibrated (CLIP ViT-B/32-like), flat, "
              "clustered, or a heavy-tailed world on the calibrated geometry: mixture (per-sample noise "
              "levels), duplicates (near-duplicate images), templates (generic captions), hubs, heavy (all four).")
@click.option("--index-factory", default=None,
              help="FAISS factory string (e.g. Flat, IVF1024,Flat, IVF4096,PQ64); overrides the choice.")
@click.option("--max-memory", type=MemoryType(), default=defaults.MAX_MEMORY, show_default=True,
              help="Memory budget for one modality's FAISS index; picks the index type.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Default IVF probes stored with the index.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16"]), default=defaults.DTYPE,
              show_default=True,
              help="Storage type of the normalised embeddings kept for exact rescoring "
                   "(auto: the input's own, float16 for half-precision DataComp / clip-retrieval files).")
@click.option("--cov-sample", type=click.IntRange(min=0), default=None,
              help="Rows the covariances (D_W, whitening) are computed from on large pools "
                   f"(a seeded uniform subset; default {defaults.COV_SAMPLE}; 0 = every row). Means and sums are "
                   "always exact.")
@click.option("--batch-size", type=click.IntRange(min=1), default=defaults.BUILD_BATCH, show_default=True,
              help="Rows per batch read from the source.")
@click.option("--gpu/--no-gpu", default=None, help="Use GPU FAISS (default: when a GPU is present).")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="Where the source is read (and encoded) and the FAISS lists are filled: this process, or "
                   "tasks on a Ray cluster (the same index; this process writes it).")
@click.option("--address", default=None,
              help="--engine ray: the cluster (auto, HOST:PORT, ray://HOST:PORT); default: a local cluster "
                   "of this machine's CPUs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def build_index_cmd(source, input_path, out, n, arch, logit_scale, log_logit_scale, model, pretrained, captions,
                    image_column,
                    caption_column, uid_column, skip_bad, device, workers, seed, dim, geometry, index_factory,
                    max_memory, nprobe, dtype, cov_sample, batch_size, gpu, engine, address, quiet):
    """Build a FAISS + DuckDB index of a pool.

    \b
    Examples:
      clip-density-index build-index                    # 100k-sample synthetic world -> ./index
      clip-density-index build-index --n 20000 --out small
      clip-density-index build-index --source datacomp --input metadata/ --arch l14 --out dc
      clip-density-index build-index --source clip-retrieval --input embeddings/ --out cr
      clip-density-index build-index --source open_clip --input images/ --captions caps.csv \\
          --model ViT-B-32 --pretrained laion2b_s34b_b79k --out mine
      python cli.py build-index --n 1000000 --engine ray --address auto
    """
    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.engine import open_engine
    from clip_density_index.indexer.sources import make_source

    ctx = click.get_current_context()
    given = [p.name for p in ctx.command.params if p.name in SOURCE_OPTIONS
             and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    kind = check_options(source, given)  # an option the source does not read is refused, not ignored
    logit_scale = _logit_scale(logit_scale, log_logit_scale)
    options = {name: ctx.params[name] for name in given if name in OPTION_DEFAULTS}
    if logit_scale is not None:
        options["logit_scale"] = logit_scale
    progress = _progress(quiet)
    src = make_source(source, input_path, n=n, seed=seed, progress=progress, **options)
    if n is not None and not kind.generated and src.info.n < n:
        click.echo(f"Note: --n {n:,} but {input_path} holds {src.info.n:,} samples; building all of them", err=True)
    extra = {} if cov_sample is None else {"cov_sample": cov_sample}
    runner = open_engine(engine, address)
    try:
        report = build_index(
            src, out, index_key=index_factory, max_memory=max_memory, nprobe=nprobe, dtype=dtype, **extra,
            batch_size=batch_size, use_gpu=gpu, limit=None if kind.generated else n, seed=seed,
            engine=runner, progress=progress,
        )
    finally:
        runner.close()
    label = " (SYNTHETIC data: the built-in synthetic CLIP-like world)" if report.synthetic else ""
    click.echo(f"Built {report.uri or report.path}: {report.n:,} samples, dim {report.dim}, source "
               f"{report.source}{label}")
    if report.uri:
        click.echo(f"  published to {report.uri}; its local mirror is {report.path}")
    if report.replaced:
        click.echo("  replaced the previous index there (its scores and weights are gone; run score again)")
    click.echo(f"  FAISS: {', '.join(f'{m} {k}' for m, k in report.index_keys.items())}")
    click.echo("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
               + f" (total {report.total_seconds:.1f}s, {report.n / max(report.total_seconds, 1e-9):,.0f} samples/s)")
    if report.skipped:
        click.echo(f"  skipped {report.skipped} unreadable inputs, listed in {report.skipped_report}", err=True)


@cli.command("info")
@index_dir_argument
@click.option("--json", "as_json", is_flag=True, help="Print the whole summary as JSON.")
@click.option("--verify", is_flag=True,
              help="Also check every data file against its build: checksums, unit norms, statistics "
                   "(reads every file; exit 1 when one fails).")
def info_cmd(index_dir, as_json, verify):
    """Print an index's manifest, table counts and statistics summary.

    \b
    Example:
      clip-density-index info index
      clip-density-index info index --verify
    """
    from clip_density_index.indexer.info import index_info, verify_index

    if verify:
        checks = verify_index(index_dir)
        failed = [c for c in checks if c["result"] != "ok"]
        if as_json and failed:
            click.echo(json.dumps({"verify": checks}, indent=2))
        elif not as_json:
            _echo_kv("Verify", {c["file"]: f"{c['result']}: {c['detail']}" for c in checks})
        if failed:
            raise click.ClickException(f"{len(failed)} of {len(checks)} checks of {index_dir} failed: "
                                       + "; ".join(c["detail"] for c in failed))
    info = index_info(index_dir)
    if verify:
        info["verify"] = checks
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    m = info["manifest"]
    if m["synthetic"]:
        click.echo("SYNTHETIC DATA: this index holds the built-in synthetic CLIP-like world, not real data.")
    where = f"{info['uri']} (mirror {info['path']})" if info["uri"] else info["path"]
    _echo_kv(f"Index {where}", {k: v for k, v in m.items()})
    _echo_kv("Tables (rows)", info["tables"])
    _echo_kv("Files (bytes)", {k: f"{v:,}" for k, v in info["files"].items()})
    for modality, s in info["stats"].items():
        _echo_kv(f"Statistics: {modality}", {k: f"{v:.4f}" for k, v in s.items()})
    if info["last_score_run"]:
        run = dict(info["last_score_run"])
        checks = run.pop("checks", [])
        _echo_kv("Last score run", run)
        for c in checks:
            click.echo(f"  check {c['column_name']} on {c['n_checked']:,} held-out rows: Spearman "
                       f"{c['spearman']:.5f} [{_plain(c['spearman_lo'])}, {_plain(c['spearman_hi'])}], top-25% "
                       f"overlap {c['top25_overlap']:.2%}, MAE {c['mae']:.4f}")


@cli.command("score")
@index_dir_argument
@click.option("--estimator", type=click.Choice(["auto", "exact", "strata", "mimps", "paper"]),
              default=defaults.ESTIMATOR, show_default=True,
              help="KL estimator. exact: the full softmax over the whole pool, both sides from one pass; "
                   "strata: each query's likely lists of candidates scanned exactly, the rest by a model "
                   "calibrated on exact rows; mimps: FAISS top-k + a shared uniform tail sample; paper: the "
                   "paper's softmax over a uniform sample of --paper-sample of the pool; auto: exact or "
                   f"strata, whichever timed sample blocks predict faster (exact under {defaults.AUTO_EXACT_BELOW:,} "
                   "samples); "
                   "mimps when --k / --tail-sample / --nprobe are given.")
@click.option("--exact", is_flag=True, help="The same as --estimator exact.")
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help=f"mimps: top-k candidates per query from FAISS (default {defaults.K}).")
@click.option("--tail-sample", "tail_sample", type=click.IntRange(min=0), default=None,
              help=f"mimps: m, the uniform tail sample size (default {defaults.TAIL_SAMPLE}; 0 = top-k only, biased).")
@click.option("--strata-target", type=click.FloatRange(min=0, min_open=True, max=1), default=None,
              help=f"strata: modelled share of each query's softmax mass scanned exactly (default "
                   f"{defaults.STRATA_TARGET:g}).")
@click.option("--max-fraction", type=click.FloatRange(min=0, min_open=True, max=1), default=None,
              help=f"strata: the most of the pool one query scans (default {defaults.MAX_FRACTION:g}).")
@click.option("--paper-sample", type=click.FloatRange(min=0, min_open=True, max=1), default=None,
              help=f"paper: the sample, as a fraction of the pool, drawn with replacement (default "
                   f"{defaults.PAPER_SAMPLE:g}).")
@click.option("--side", type=click.Choice(["both", "text", "image"]), default=defaults.SIDE, show_default=True,
              help="text: each caption against all images; image: each image against all captions.")
@click.option("--logit-scale", type=float, default=None,
              help="a (default: the index's, from its manifest); a itself, ~100 for CLIP (a value <= 7 warns).")
@click.option("--log-logit-scale", type=float, default=None,
              help="The logit scale in log form, as the paper's DataComp code takes it (4.6052 = log 100).")
@click.option("--logit-bias", type=float, default=None, help="SigLIP bias b: use the sigmoid-loss ('tau_b') formulas.")
@click.option("--metrics", default=None,
              help="Comma-separated subset of kl,klr,dc,dw,rawnorm,conformity,conformity_est,loglik,clipscore "
                   "(default all).")
@click.option("--seed", type=SEED, default=defaults.SEED, show_default=True,
              help="Seed of the samples (tail, paper, check rows).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"Queries per resumable chunk (default {defaults.SCORE_BATCH}).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="mimps: IVF lists to visit (default: the index's).")
@click.option("--check", type=click.IntRange(min=2), default=None,
              help="Held-out rows per side whose exact KL the run compares with its own (Spearman, top-25% "
                   f"overlap, MAE, with 95% intervals). Approximate runs always check (default {defaults.CHECK}, a "
                   "quarter of a small pool); exact runs only when asked.")
@click.option("--target-spearman", type=click.FloatRange(0, 1), default=defaults.TARGET_SPEARMAN,
              show_default=True,
              help="Accuracy an approximate run's check must show; the run says whether it did.")
@click.option("--target-overlap", type=click.FloatRange(0, 1), default=defaults.TARGET_OVERLAP, show_default=True,
              help="Top-25% overlap an approximate run's check must show.")
@click.option("--precision", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default=None,
              help="Score precision of the exact work (default float32 on CPUs, float16 on CUDA GPUs).")
@click.option("--device", default=defaults.DEVICE, show_default=True, help="torch device for the dense parts.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="Where the KL chunks run: this process, or tasks on a Ray cluster (the index on a path "
                   "every node reads, or a URI each node mirrors); the same numbers either way.")
@click.option("--address", default=None,
              help="--engine ray: the cluster (auto, HOST:PORT, ray://...); default a local one of this machine's CPUs.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def score_cmd(index_dir, estimator, exact, k, tail_sample, strata_target, max_fraction, paper_sample, side, logit_scale, log_logit_scale,
              logit_bias, metrics,
              seed, batch_size, nprobe, check, target_spearman, target_overlap, precision, device, engine, address,
              as_json, quiet):
    """Score every sample: KL / KLR (both sides), D_C, D_W, raw norm, conformity, whitened
    log-likelihood and CLIPScore, into the catalog's `scores` table.

    An interrupted run resumes where it stopped when rerun with the same options. Every
    approximate run (mimps, paper) measures its own accuracy on held-out exact rows and prints it.

    \b
    Examples:
      clip-density-index score index                     # auto: exact, both sides in one pass
      clip-density-index score index --estimator strata  # the fast approximation, self-checked
      clip-density-index score index --estimator mimps   # SPEC 3.1, with its measured accuracy
      clip-density-index score index --estimator paper   # the paper's 0.2% sample, for comparison
      clip-density-index score index --side text --metrics kl,klr
      clip-density-index score index --engine ray --address auto   # chunks as tasks on a Ray cluster
    """
    _note_synthetic(index_dir)
    logit_scale = _logit_scale(logit_scale, log_logit_scale)
    from clip_density_index.queries.score_report import report_dict
    from clip_density_index.queries.scoring import score

    if exact and estimator not in ("auto", "exact"):
        raise click.UsageError(f"--exact contradicts --estimator {estimator}")
    chosen = "exact" if exact else estimator
    for only, options in (("mimps", (("--k", k), ("--tail-sample", tail_sample), ("--nprobe", nprobe))),
                          ("strata", (("--strata-target", strata_target), ("--max-fraction", max_fraction))),
                          ("paper", (("--paper-sample", paper_sample),))):
        given = [f for f, v in options if v is not None]
        if given and chosen not in (only, "auto") or given and only == "paper" and chosen != "paper":
            verb = "applies" if len(given) == 1 else "apply"
            raise click.UsageError(f"{' / '.join(given)} only {verb} to --estimator {only}, not to {chosen}")
    if paper_sample is None:
        paper_sample = defaults.PAPER_SAMPLE
    metric_list = None if metrics is None else [m.strip() for m in metrics.split(",") if m.strip()]
    report = score(index_dir, estimator=chosen, k=k, tail_sample=tail_sample, side=side,
                   logit_scale=logit_scale, logit_bias=logit_bias, metrics=metric_list, seed=seed,
                   batch_size=batch_size, nprobe=nprobe, check=check, precision=precision,
                   paper_sample=paper_sample, target_spearman=target_spearman, target_overlap=target_overlap,
                   strata_target=strata_target, max_fraction=max_fraction, device=device, engine=engine,
                   address=address, progress=_progress(quiet))
    if as_json:
        click.echo(json.dumps(report_dict(report), indent=2, default=str))
        return
    _echo_score_report(report, paper_sample)


def _echo_score_report(report, paper_sample: float) -> None:
    """``score``'s summary for people: the estimator and why, the columns, each side's cost, the
    engine, reused chunks, the held-out checks and whether they met the targets."""
    how = {"exact": f"exact softmax, {report.precision}", "strata": "strata: scanned lists + calibrated model",
           "mimps": f"mimps: top-k {report.k} + tail sample {report.m}",
           "paper": f"paper: softmax over a {paper_sample:g} sample", None: "no KL"}[report.estimator]
    click.echo(f"Scored {report.n:,} samples of {report.path} ({how}, a = {report.logit_scale:g}) "
               f"in {report.total_seconds:.1f}s; run {report.run_id}")
    if report.estimator and report.reason != "asked for":
        click.echo(f"  estimator: {report.reason}")
    click.echo(f"  columns: {', '.join(report.columns)}")
    for s, d in report.dots_per_query.items():
        probes = report.nprobe.get(s)
        searched = {"exact": "every candidate", "paper": "a uniform sample",
                    "strata": "lists scanned by modelled mass"}.get(report.estimator, report.index_keys.get(s, ""))
        if s in report.details and "lists" in report.details[s]:
            dt = report.details[s]
            searched += f" ({dt['lists']:,} lists, gamma {dt['gamma']:.3f} from {dt['calibration_rows']} exact rows)"
        searched += "" if probes is None else f" nprobe {probes}"
        cost = ("dot products per query not counted (a graph search's cost depends on the data)" if d is None
                else f"{d:,.0f} dot products per query ({d / report.n:.2%} of exact)")
        click.echo(f"  {s} side: {searched}, {cost}")
    if report.engine != "local":
        click.echo(f"  engine: {report.engine}")
    if report.chunks_reused:
        click.echo(f"  resumed: reused {report.chunks_reused} finished chunks")
    for c in report.checks:
        click.echo(f"  check {c.column} on {c.n:,} held-out rows: Spearman {c.spearman:.5f} "
                   f"[{c.spearman_ci[0]:.5f}, {c.spearman_ci[1]:.5f}], top-25% overlap {c.top25_overlap:.2%} "
                   f"[{c.top25_overlap_ci[0]:.2%}, {c.top25_overlap_ci[1]:.2%}], MAE {c.mae:.4f}")
    if report.targets_met is not None and not report.exact:
        sp, ov = report.targets
        verdict = "met" if report.targets_met else "NOT met: use --estimator exact for exact-grade rankings"
        click.echo(f"  accuracy targets (Spearman >= {sp:g}, top-25% overlap >= {ov:.0%}): {verdict}")


# -- read side: sql, query, select, weights, sample (Python API in queries/) ---------------------
OUTPUT_FORMATS = ("table", "csv", "jsonl", "parquet")

format_option = click.option(
    "-f", "--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None,
    help="Output format (default: an aligned table on stdout, or from the --out suffix: "
         ".csv, .jsonl, .parquet). parquet needs --out.")
out_option = click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="Write the result to this file instead of stdout (parent folders are created).")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
width_option = click.option("--width", type=click.IntRange(min=0), default=defaults.WIDTH, show_default=True,
                            help="Table format: truncate cells to this many characters (0: never).")
prompt_options = [
    click.option("--prompt", default=None,
                 help="Domain prompt, e.g. \"a photo of food\", encoded with the index's own model "
                      "(with --prompt-embedding: only its label)."),
    click.option("--prompt-embedding", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="A .npy text embedding of the prompt, shape (d,) or (1, d), from the index's "
                      "model (see encode-text); for when the model's weights cannot be loaded here."),
    click.option("--logit-scale", type=float, default=defaults.PROMPT_LOGIT_SCALE, show_default=True,
                 help="a' in w(x) = exp(a' cos(image x, prompt)); the paper lowered it from ~100 to 10."),
    click.option("--device", default=defaults.DEVICE, show_default=True,
                 help="open_clip: torch device for the prompt."),
    click.option("--model", default=None,
                 help="open_clip model for --prompt (default: the one the index's manifest records, e.g. "
                      "ViT-L-14 for a DataComp --arch l14 index)."),
    click.option("--pretrained", default=None,
                 help="open_clip weights for --prompt: a tag or a local checkpoint file (default: the "
                      "manifest's; a local copy when the tag cannot be downloaded here)."),
]


def _prompt_options(f):
    for option in reversed(prompt_options):
        f = option(f)
    return f


def _engine_options(f):
    """--engine / --address of weights and sample: the pool's partitions as tasks on a Ray cluster."""
    f = click.option("--address", default=None,
                     help="--engine ray: the cluster (auto, HOST:PORT, ray://...); default a local one of this "
                          "machine's CPUs.")(f)
    return click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                        help="Where the pool's images are read: this process, or one task per partition of the "
                             "pool on a Ray cluster (the index on a path every node reads, or a URI each node "
                             "mirrors); the same results.")(f)


def _need_prompt(prompt, prompt_embedding) -> None:
    if prompt is None and prompt_embedding is None:
        raise click.UsageError("give --prompt TEXT or --prompt-embedding FILE.npy")


def _emit(table, fmt, out, force, width, what: str = "rows") -> None:
    """Print a result table to stdout, or write it to ``out`` and say so on stderr."""
    from clip_density_index.queries.formats import write_result

    text = write_result(table, fmt, out, force=force, max_width=width)
    if out is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"Wrote {table.num_rows:,} {what} to {out}", err=True)


@cli.command("sql")
@click.argument("index_dir", type=IndexType())
@click.argument("query")
@format_option
@out_option
@force_option
@width_option
def sql_cmd(index_dir, query, fmt, out, force, width):
    """Run one read-only SQL query over an index's catalog.

    Tables: samples (uid, caption, vec_id, source metadata), scores (uid, vec_id and the
    score columns kl_text, klr_text, kl_image, ..., clipscore), weights (prompt, uid, weight,
    normalized_weight, ...), manifest. The catalog is opened read-only: only SELECT / WITH /
    DESCRIBE / SHOW / SUMMARIZE / EXPLAIN statements run.

    \b
    Examples:
      clip-density-index sql index "SELECT count(*) FROM samples"
      clip-density-index sql index "SELECT caption, kl_text FROM scores JOIN samples USING (vec_id, uid)
          ORDER BY kl_text DESC LIMIT 5"
      clip-density-index sql index "FROM scores" --out scores.parquet
    """
    _note_synthetic(index_dir)
    from clip_density_index.queries.formats import format_for
    from clip_density_index.queries.sqlrun import run_sql

    fmt = format_for(out, fmt)
    _emit(run_sql(index_dir, query), fmt, out, force, width)


@cli.command("query")
@click.argument("index_dir", required=False, type=IndexType())
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the named queries, their descriptions and parameters.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter of the query, e.g. --param column=klr_text --param limit=50 (repeatable).")
@format_option
@out_option
@force_option
@width_option
def query_cmd(index_dir, name, list_, params, fmt, out, force, width):
    """Run a named query (a SQL file shipped in sql/) over an index's catalog.

    Values reach the SQL only as bound parameters; a score-column parameter must name a numeric
    column of the scores table.

    \b
    Examples:
      clip-density-index query --list
      clip-density-index query index top_by_score --param column=klr_text --param limit=10
      clip-density-index query index score_deciles --param column=kl_text
      clip-density-index query index score_correlations
      clip-density-index query index ngram_coverage --param column=kl_text --param top=2500
    """
    if index_dir is not None:
        _note_synthetic(index_dir)
    from clip_density_index.queries.formats import format_for
    from clip_density_index.queries.named import list_queries
    from clip_density_index.queries.sqlrun import run_query

    if list_:
        import textwrap

        for q in list_queries():
            click.echo(q.name)
            click.echo(textwrap.fill(q.description, 100, initial_indent="  ", subsequent_indent="  "))
            for p in q.params:
                click.echo(textwrap.fill(f"--param {p.describe()}", 100, initial_indent="    ",
                                         subsequent_indent="        "))
        return
    if index_dir is None or name is None:
        raise click.UsageError("give INDEX_DIR and a query NAME (see `query --list`)")
    values: dict[str, str] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        if key.strip() in values:
            raise click.BadParameter(f"parameter {key.strip()!r} given twice", param_hint="--param")
        values[key.strip()] = value
    fmt = format_for(out, fmt)
    table = run_query(index_dir, name, **values)
    if fmt == "table" and out is None:  # a title, so that two tables in a row can be told apart
        from clip_density_index.queries.named import get_query

        about = get_query(name).description.split(": ", 1)[0].split(". ", 1)[0].rstrip(".")
        given = ", ".join(f"{k}={v}" for k, v in values.items())
        click.echo(f"{name}{f' ({given})' if given else ''}: {about}")
    _emit(table, fmt, out, force, width)


@cli.command("select")
@index_dir_argument
@click.option("--by", default=None, help="Score column to rank by, e.g. kl_text or klr_text (the paper's best).")
@click.option("--top-fraction", type=float, default=None,
              help="With --by: fraction F in (0, 1] to keep, of the rows that passed --where: floor(F x "
                   "candidates) samples, at least 1.")
@click.option("--keep", "keeps", multiple=True, metavar="COLUMN:FRACTION[:lowest]",
              help="Keep this fraction by a score or numeric samples column (repeatable; e.g. "
                   "clip_l14_similarity_score:0.3 --keep kl_text:0.25). See --mode.")
@click.option("--mode", type=click.Choice(["pool", "filtered"]), default=None,
              help="--keep: pool (default): each fraction of the WHOLE pool, the sets intersected (with "
                   "--where too); filtered: --where first, then each --keep in order on what is left "
                   "(what --by / --top-fraction do).")
@click.option("--count", type=click.Choice(["floor", "paper"]), default=defaults.COUNT_RULE, show_default=True,
              help="Rows a fraction keeps: floor (floor(F x N)) or paper (floor(F x N) + 1, as the "
                   "paper's selection code).")
@click.option("--where", default=None,
              help="SQL condition over samples and scores columns, e.g. \"clipscore > 0.7\".")
@click.option("--lowest", is_flag=True, help="With --by: keep the lowest scores instead of the highest.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the selection: .npy (DataComp subset: uids as u8,u8, sorted), .txt (uids, sorted) "
                   "or .parquet (rank, uid, vec_id and the ranked column(s), best first).")
@force_option
def select_cmd(index_dir, by, top_fraction, keeps, mode, count, where, lowest, out, force):
    """Keep the top fraction of the pool by a score (KL-guided data selection).

    --by COLUMN --top-fraction F: --where filters first; rows with a NULL score are dropped; then
    floor(F x remaining) samples (at least 1) with the highest score are kept, ties broken by uid.

    --keep COLUMN:FRACTION (repeatable), DataComp style: each fraction of the whole pool,
    intersected (--mode pool), or one after the other on what is left (--mode filtered).

    \b
    Examples:
      clip-density-index select index --by kl_text --top-fraction 0.25 --out subset.npy
      clip-density-index select index --by klr_text --top-fraction 0.3 --where "clipscore > 0.7" --out clean.npy
      clip-density-index select dc --keep clip_l14_similarity_score:0.3 --out clip30.npy
      clip-density-index select dc --keep clip_l14_similarity_score:0.3 --keep kl_text:0.25 --out both.npy
      clip-density-index select dc --mode filtered --keep clipscore:0.3 --keep kl_text:0.25 --out then.npy
    """
    if keeps and (by is not None or top_fraction is not None or lowest):
        raise click.UsageError("give --keep, or --by with --top-fraction (and --lowest), not both")
    if not keeps and (by is None or top_fraction is None):
        raise click.UsageError("give --by COLUMN --top-fraction F, or one or more --keep COLUMN:FRACTION")
    if mode is not None and not keeps:
        raise click.UsageError("--mode applies to --keep (--by / --top-fraction always filter first)")
    _note_synthetic(index_dir)
    kind = {".npy": "DataComp subset format", ".txt": "one uid per line", ".parquet": "parquet"}
    if keeps or count != defaults.COUNT_RULE:
        from clip_density_index.queries.keep import Keep, select_keep

        keep_list = list(keeps) or [Keep(by, top_fraction, lowest)]
        ks = select_keep(index_dir, keep_list, where=where, mode=mode or ("pool" if keeps else "filtered"),
                         count=count, out=out, force=force)
        if where is not None:
            click.echo(f"{ks.passed_where:,} of {ks.total:,} samples passed --where {where}")
        for st in ks.steps:
            sign = "<=" if st.keep.lowest else ">="
            side = "lowest" if st.keep.lowest else "highest"
            of = "of the pool" if ks.mode == "pool" else "of those left"
            click.echo(f"  --keep {st.keep}: {st.kept:,} {side} of {st.of:,} {of}"
                       + (f" ({st.keep.column} {sign} {st.threshold:.6g})" if st.threshold is not None else "")
                       + (f"; {st.of - st.candidates:,} without a value" if st.of > st.candidates else ""))
        how = "intersection" if ks.mode == "pool" else "one after the other"
        click.echo(f"Kept {ks.kept:,} of {ks.total:,} samples ({ks.kept / max(ks.total, 1):.2%}; {ks.mode} mode, "
                   f"{how}, count {count})")
        if out is not None:
            click.echo(f"Wrote {ks.kept:,} uids to {out} ({kind.get(out.suffix.lower(), '')})")
        return
    from clip_density_index.queries.selection import select

    sel = select(index_dir, by, top_fraction, where=where, lowest=lowest, out=out, force=force)
    side = "lowest" if lowest else "highest"
    if where is not None:
        click.echo(f"{sel.passed_where:,} of {sel.total:,} samples passed --where {where}")
    dropped = sel.passed_where - sel.candidates
    if dropped:
        click.echo(f"{dropped:,} samples have no {by} value and were dropped")
    click.echo(f"Kept {sel.kept:,} of {sel.candidates:,} samples ({side} {by}, fraction {sel.fraction:g}"
               + (f"; {by} {'<=' if lowest else '>='} {sel.threshold:.6g})" if sel.threshold is not None else ")"))
    if out is not None:
        click.echo(f"Wrote {sel.kept:,} uids to {out} ({kind.get(out.suffix.lower(), '')})")


@cli.command("weights")
@index_dir_argument
@_prompt_options
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also export uid, weight, normalized_weight to .parquet / .csv / .jsonl.")
@force_option
@_engine_options
def weights_cmd(index_dir, prompt, prompt_embedding, logit_scale, device, model, pretrained, out, force, engine,
                address):
    """Importance weights of every image for a domain prompt: w = exp(a' cos), stored in `weights`.

    Prints the effective sample size ESS = (sum w)^2 / sum w^2 and a summary of the normalised
    weights w / mean(w). Rows of the same prompt are replaced.

    \b
    Examples:
      clip-density-index weights index --prompt "a photo of food"
      clip-density-index weights index --prompt "a photo of food" --logit-scale 20 --out food.parquet
      clip-density-index weights dc --prompt "a photo of food"  # DataComp index: its ViT-L-14 / ViT-B-32
      clip-density-index weights dc --prompt "a photo of food" --pretrained /models/vit-l-14-openai.pt
      clip-density-index weights dc --prompt-embedding food.npy --prompt "a photo of food"
      clip-density-index weights /shared/dc --prompt "a photo of food" --engine ray --address auto
    """
    _note_synthetic(index_dir)
    from clip_density_index.queries.weighting import weights

    _need_prompt(prompt, prompt_embedding)
    w = weights(index_dir, prompt, prompt_embedding, logit_scale, out=out, force=force, device=device, model=model,
                pretrained=pretrained, engine=engine, address=address)
    s = w.summary()
    click.echo(f"Prompt {w.prompt!r} ({w.encoder}), a' = {w.logit_scale:g}, {w.n:,} images")
    click.echo(f"  ESS {s['ess']:,.1f} ({s['ess_fraction']:.2%} of n)")
    click.echo(f"  normalized weight: min {s['min']:.4g}, median {s['median']:.4g}, max {s['max']:.4g}; "
               f"top 1% of samples hold {s['top1_share']:.1%} of the weight")
    click.echo("  stored in table weights" + (f"; exported to {w.out}" if w.out else ""))


@cli.command("sample")
@index_dir_argument
@_prompt_options
@click.option("-n", "n", type=click.IntRange(min=1), required=True, help="How many samples.")
@click.option("--mode", type=click.Choice(["draw", "top"]), default=defaults.SAMPLE_MODE, show_default=True,
              help="draw: random, probability proportional to the weight; top: the highest weights (FAISS).")
@click.option("--seed", type=SEED, default=defaults.SEED, show_default=True,
              help="Seed of the draw (same seed, same draw).")
@click.option("--replace/--no-replace", default=False, show_default=True,
              help="--mode draw: draw with replacement (default: without, by the Gumbel-top-k trick).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="--mode top: IVF lists to probe (default: a quarter of them; more is slower, surer).")
@click.option("--exact", is_flag=True,
              help="--mode top: the exact top n, from every image's cosine (any index type, O(n d)).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the rows to .parquet / .csv / .jsonl.")
@force_option
@width_option
@_engine_options
def sample_cmd(index_dir, prompt, prompt_embedding, logit_scale, device, model, pretrained, n, mode, seed, replace,
               nprobe, exact, out, force, width, engine, address):
    """Domain-weighted samples for a prompt: a seeded weighted draw, or the top samples by weight.

    \b
    Examples:
      clip-density-index sample index --prompt "a photo of food" -n 20
      clip-density-index sample index --prompt "a photo of food" -n 1000 --seed 1 --out food_draw.parquet
      clip-density-index sample index --prompt "a photo of food" -n 20 --mode top
      clip-density-index sample /shared/dc --prompt "a photo of food" -n 1000 --engine ray --address auto
    """
    _note_synthetic(index_dir)
    from clip_density_index.queries.formats import render_table
    from clip_density_index.queries.weighting import sample

    _need_prompt(prompt, prompt_embedding)
    if mode == "top" and replace:
        raise click.UsageError("--replace only applies to --mode draw")
    if mode == "draw" and (nprobe is not None or exact):
        raise click.UsageError("--nprobe and --exact only apply to --mode top")
    if exact and nprobe is not None:
        raise click.UsageError("give --nprobe or --exact, not both")
    table = sample(index_dir, prompt, prompt_embedding, n, mode=mode, seed=seed, replace=replace,
                   logit_scale=logit_scale, out=out, force=force, device=device, nprobe=nprobe, exact=exact,
                   printed=out is None, model=model, pretrained=pretrained, engine=engine, address=address)
    cols = [c for c in ("rank", "uid", "caption", "cosine", "weight", "normalized_weight") if c in table.column_names]
    shown = table.select(cols)
    if out is not None:
        shown = shown.slice(0, 10)
    click.echo(render_table(shown, width, footer=out is None), nl=False)
    if out is not None:
        more = table.num_rows - shown.num_rows
        click.echo((f"... {more:,} more; " if more else "") + f"wrote {table.num_rows:,} rows to {out}")


@cli.command("encode-text")
@click.argument("texts", nargs=-1, required=True)
@click.option("--index", "index_dir", type=IndexType(), default=None,
              help="Index (a directory or a URI) whose manifest names the model (and whose dimension is checked).")
@click.option("--model", default=None, help="open_clip model (default: the --index's).")
@click.option("--pretrained", default=None, help="open_clip weights: a tag or a local checkpoint file (default: the --index's).")
@click.option("--raw", is_flag=True, help="Keep the model's raw vectors (default: unit vectors).")
@click.option("--device", default=defaults.DEVICE, show_default=True, help="torch device.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npy file: shape (d,) for one text, (n, d) for several, in the order given.")
@force_option
def encode_text_cmd(texts, index_dir, model, pretrained, raw, device, out, force):
    """Encode prompts with an open_clip text tower into a .npy, for --prompt-embedding.

    Use it where the model's weights are available, then pass the file to `weights` / `sample` of
    an index on a machine that cannot load them.

    \b
    Examples:
      clip-density-index encode-text "a photo of food" --index dc-index --out food.npy
      clip-density-index encode-text "a photo of food" --model ViT-L-14 --pretrained openai --out food.npy
      clip-density-index weights dc-index --prompt-embedding food.npy --prompt "a photo of food"
    """
    from clip_density_index.queries.prompts import encode_text

    if index_dir is None and (model is None or pretrained is None):
        raise click.UsageError("give --index DIR, or --model NAME and --pretrained TAG_OR_CHECKPOINT")
    emb = encode_text(index_dir, list(texts), model=model, pretrained=pretrained, out=out, force=force,
                      normalize=not raw, device=device)
    shape = f"({emb.shape[1]},)" if len(texts) == 1 else f"({emb.shape[0]}, {emb.shape[1]})"
    click.echo(f"Wrote {len(texts)} text embedding{'s' if len(texts) > 1 else ''} of shape {shape} to {out}")


@cli.command("serve")
@index_dir_argument
@click.option("--host", default=defaults.HOST, show_default=True,
              help="Address to listen on (127.0.0.1: this machine only; the app has no authentication).")
@click.option("--port", type=click.IntRange(1, 65535), default=defaults.PORT, show_default=True, help="Port.")
def serve_cmd(index_dir, host, port):
    """A local, read-only web explorer of the index: gallery by score, plots, prompt, selection.

    \b
    Examples:
      clip-density-index serve index             # then open http://127.0.0.1:8000/
      clip-density-index serve dc-index --port 8080
    """
    _note_synthetic(index_dir)
    from clip_density_index.explorer.app import serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Warning: serving on {host}: anyone who can reach it can read the whole catalog", err=True)
    serve(index_dir, host, port,
          announce=lambda: click.echo(f"Serving {index_dir} on http://{host}:{port}/ (Ctrl-C stops)", err=True))


@cli.command("report")
@index_dir_argument
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The HTML file to write (self-contained: no external requests).")
@force_option
def report_cmd(index_dir, out, force):
    """One self-contained HTML report: overview, histograms, correlations, top / bottom samples.

    \b
    Example:
      clip-density-index report index --out report.html
    """
    _note_synthetic(index_dir)
    from clip_density_index.explorer.report import write_report

    path = write_report(index_dir, out, force=force)
    click.echo(f"Wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    cli()

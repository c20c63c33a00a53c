"""The ``stmdit`` command line."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
import yaml
from tqdm.auto import tqdm

from stmdit import defaults
from stmdit.errors import StmditError

app = typer.Typer(
    name="stmdit",
    help="Synthesize H&E tiles from spatial transcriptomics with a diffusion transformer.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress; show tracebacks of errors")]
# Options that feed sampling or batching: a zero, a negative or a NaN is a usage error (exit 2).
Steps = typer.Option(min=1, help="Sampling steps (DPM-Solver++ for latent models, DDIM in pixel space)")
BatchSize = typer.Option(min=1)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number; got {value}")
    return value


def _positive(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0; got {value}")
    return value


def _fail(message: str, code: int = 1) -> NoReturn:
    # A progress bar still open on stderr (the failure interrupted its loop) would share the
    # message's line: tqdm.write clears the bars, prints the line, then redraws them.
    line = f"error: {message}"
    tqdm.write(click.style(line, fg="red") if sys.stderr.isatty() else line, file=sys.stderr)
    raise typer.Exit(code=code)


PrecisionOption = Annotated[
    str,
    typer.Option(
        help="Transformer compute precision: auto (bf16 where the CPU/GPU has bf16 units), fp32 or bf16"
    ),
]


def _use_precision(ctx: typer.Context, precision: str) -> None:
    """Pipeline calls of this command run in ``precision`` (restored when the command ends)."""
    from stmdit.precision import PRECISIONS, default_precision

    if precision not in PRECISIONS:
        _fail(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    ctx.with_resource(default_precision(precision))


def _message(err: BaseException) -> str:
    """The text of a user-facing failure; built-in errors that do not name their file are
    named by type so the message still says what happened."""
    from pydantic import ValidationError

    from stmdit.config import describe_validation_error

    if isinstance(err, ValidationError):
        return describe_validation_error(err)
    if isinstance(err, KeyError):  # str(KeyError) is the quoted key alone
        return f"missing entry {err.args[0]!r}" if err.args else "missing entry"
    if isinstance(err, EOFError):
        return f"an input file ends early (truncated or still being written): {err}"
    text = str(err)
    if isinstance(err, StmditError) or isinstance(err, (ValueError, OSError)):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}"


def command(*args, **kwargs):
    """``app.command`` that turns failures into one readable line and exit status 1.

    Usage errors stay click's (exit 2); a user-facing failure (the project's own errors,
    OSError, ValueError, KeyError, EOFError: what bad input raises) prints its message; any
    other exception is a bug and says so. A traceback is printed only with ``--verbose``.
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            except (typer.Exit, typer.Abort, click.ClickException):
                raise
            except KeyboardInterrupt:
                _fail("interrupted", code=130)
            except (StmditError, OSError, ValueError, KeyError, EOFError, yaml.YAMLError) as err:
                if kw.get("verbose"):
                    traceback.print_exc()
                _fail(_message(err))
            except Exception as err:
                if kw.get("verbose"):
                    traceback.print_exc()
                _fail(
                    f"unexpected {_message(err)} (a bug: rerun with --verbose for the traceback, and report it)"
                )

        return app.command(*args, **kwargs)(wrapper)

    return decorate


@command()
def demo(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for grids, curves, checkpoints and metrics.json")
    ] = Path("outputs/demo"),
    quick: Annotated[bool, typer.Option(help="Seconds-long smoke run of the same code path")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the simulated data and the evaluators")] = 0,
    train_seed: Annotated[
        int | None, typer.Option(help="Seed for training and sampling noise (default: --seed)")
    ] = None,
    precision: PrecisionOption = "auto",
    verbose: Verbose = False,
) -> None:
    """Simulate tissue, train a GE-conditioned STMDiT and a no-GE baseline, and compare them."""
    from stmdit.demo import DemoSettings, run_demo

    _setup_logging(verbose)
    settings = DemoSettings.quick() if quick else DemoSettings()
    settings.seed = seed
    settings.train_seed = train_seed
    _use_precision(ctx, precision)
    settings.precision = precision
    metrics = run_demo(out, settings)
    rows = ["real_tiles", "ge_only", "morph_ge", "morph_only", "unconditional"]
    typer.echo(f"\n{'setting':<15}{'composition_corr':>18}{'composition_mae':>17}{'fidelity_auc':>14}")
    for row in rows:
        m = metrics[row]
        typer.echo(
            f"{row:<15}{m['composition_corr']:>18.3f}{m['composition_mae']:>17.3f}{m['fidelity_auc']:>14.3f}"
        )
    typer.echo(
        f"\nwrote {out}/metrics.json, samples_grid.png, loss_curves.png, composition_scatter.png, runs/"
    )


@command()
def train(
    config: Annotated[
        Path,
        typer.Argument(help="Training config (YAML); see README for the keys", exists=True, dir_okay=False),
    ],
    output_dir: Annotated[str | None, typer.Option(help="Override the config's output_dir")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override the config's max_steps")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir")] = True,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow encoder checkpoints that need unpickling (runs code from them)")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Train an STMDiT. Works in one process or under ``accelerate launch``."""
    from stmdit.data.sources import load_training_data
    from stmdit.train import TrainConfig, Trainer, TrainingInterrupted

    _setup_logging(verbose)
    overrides = {k: v for k, v in (("output_dir", output_dir), ("max_steps", max_steps)) if v is not None}
    cfg = TrainConfig.from_yaml(config, **overrides)
    spec = cfg.to_dict()
    if spec["data"]["source"] == "store" and not (Path(cfg.data.path) / "manifest.json").is_file():
        _fail(
            f"{config}: data.path: {cfg.data.path} is not a prepared dataset (no manifest.json); "
            "run `stmdit prepare` first"
        )
    try:
        data = load_training_data(
            {**spec["data"], **({"trust_pickle": True} if trust_pickle else {})}, spec["model"]
        )
        result = Trainer(
            cfg,
            data.train,
            ge_encoder=data.ge_encoder,
            morphology_encoder=data.morphology_encoder,
            vae=data.vae,
            val=data.val,
            resume=resume,
        ).run()
    except TrainingInterrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(code=130) from None
    from stmdit.distributed import process_state

    if process_state().is_main_process:
        typer.echo(f"trained to step {result.final_step}; pipeline saved to {result.pipeline_dir}")


@command()
def prepare(
    config: Annotated[
        Path,
        typer.Argument(
            help="Prepare config (YAML): out, samples, tile_um, tile_px, ...", exists=True, dir_okay=False
        ),
    ],
    out: Annotated[str | None, typer.Option(help="Override the config's output folder")] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard what an earlier run wrote in the folder and start over")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Read samples, tile every spot and write a prepared dataset (resumes when rerun)."""
    from stmdit.data.store import PrepareConfig
    from stmdit.data.store import prepare as run_prepare

    _setup_logging(verbose)
    store = run_prepare(PrepareConfig.from_yaml(config, out=out), restart=restart)
    from stmdit.distributed import process_state

    if not process_state().is_main_process:  # one summary, not one per process
        return
    stages = store.manifest()["stages"]
    typer.echo(
        f"{store.root}: {stages['spots']['n_spots']} spots, {stages['tiles']['kept']} kept "
        f"({stages['tiles']['dropped_background']} background, {stages['tiles']['at_edge']} at the image edge)"
    )


@command()
def encode(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset folder")],
    ge_encoder: Annotated[str, typer.Option(help="panel | cancerfoundation[:FOLDER]")] = "panel",
    n_genes: Annotated[
        int | None, typer.Option(min=1, help="GE panel size (default: panel 256, CancerFoundation 1199)")
    ] = None,
    morphology_encoder: Annotated[
        str, typer.Option(help="stain | uni2h[:SOURCE] | timm:NAME[@WEIGHTS] | auto")
    ] = "stain",
    morphology_grid: Annotated[
        int, typer.Option(min=1, help="Tokens per side (4 = PixCell-1024's 4 x 4 grid)")
    ] = 1,
    vae: Annotated[str, typer.Option(help="none (pixel space) | sd35 | VAE folder or hub id")] = "none",
    ge_tokens: Annotated[bool, typer.Option(help="Also cache per-gene GE tokens (for PMA models)")] = False,
    features: Annotated[
        str, typer.Option(help="Features to cache, comma-separated (others: on the fly)")
    ] = "latents,morphology,ge",
    batch_size: Annotated[int, BatchSize] = 32,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow checkpoints that need unpickling (runs code from them)")
    ] = False,
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Discard the store's earlier features and encoders and start over"),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Cache frozen-encoder features in a prepared dataset (resumes; shards under accelerate launch)."""
    from stmdit.data.encode import EncodeConfig
    from stmdit.data.encode import encode as run_encode

    _setup_logging(verbose)
    cfg = EncodeConfig(
        ge_encoder=ge_encoder,
        n_genes=n_genes,
        morphology_encoder=morphology_encoder,
        morphology_grid=morphology_grid,
        vae=vae,
        ge_tokens=ge_tokens,
        batch_size=batch_size,
        features=tuple(f for f in features.split(",") if f),
        trust_pickle=trust_pickle,
    )
    store = run_encode(dataset, cfg, restart=restart)
    from stmdit.distributed import process_state

    if not process_state().is_main_process:
        return
    for name, info in store.manifest().get("features", {}).items():
        typer.echo(f"{name}: {tuple(info['shape'])} {info['dtype']} from {info['encoder']}")


@command("train-predictor")
def train_predictor(
    dataset: Annotated[
        Path, typer.Argument(help="Prepared dataset folder (train split for fitting, val for early stopping)")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the predictor (safetensors, gene list, scaler)")],
    morphology_encoder: Annotated[
        str, typer.Option(help="stain | uni2h[:SOURCE] | timm:NAME[@WEIGHTS]")
    ] = "stain",
    n_genes: Annotated[
        int | None,
        typer.Option(min=1, help="Top highly variable genes to predict [default: 5000, DeepSpot's]"),
    ] = None,
    gene_selection: Annotated[
        str | None,
        typer.Option(
            help="seurat_v3_paper (DeepSpot's, default; the sample as batch) | seurat_v3 | variance "
            "(the last two are departures, recorded)"
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 100,
    batch_size: Annotated[int, BatchSize] = 256,
    leave_one_patient_out: Annotated[
        bool, typer.Option(help="Also fit one model per held-out patient")
    ] = False,
    seed: Annotated[int, typer.Option()] = 0,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow checkpoints that need unpickling (runs code from them)")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Train the DeepSpot-style expression predictor (H&E features -> spot expression)."""
    from stmdit.predictor import train_predictor_command

    _setup_logging(verbose)
    path = train_predictor_command(
        dataset,
        out,
        morphology_encoder=morphology_encoder,
        n_genes=n_genes,
        gene_selection=gene_selection,
        epochs=epochs,
        leave_one_patient_out=leave_one_patient_out,
        seed=seed,
        trust_pickle=trust_pickle,
        batch_size=batch_size,
    )
    typer.echo(f"predictor saved to {path}")


@command()
def evaluate(
    config: Annotated[
        Path,
        typer.Argument(
            help="Evaluate config (YAML): out, dataset, models, predictor, seeds, ...",
            exists=True,
            dir_okay=False,
        ),
    ],
    out: Annotated[str | None, typer.Option(help="Override the config's output folder")] = None,
    inception_weights: Annotated[
        str | None, typer.Option(help="FID Inception weights file (or STMDIT_INCEPTION_WEIGHTS)")
    ] = None,
    download_weights: Annotated[
        bool, typer.Option("--download-weights", help="Fetch the FID Inception weights if absent (network)")
    ] = False,
    update_model_card: Annotated[
        bool,
        typer.Option(
            "--update-model-card",
            help="Also write the metrics into each pipeline's own README.md (its model card); "
            "by default the pipelines are only read and the cards go to OUT/model_cards/MODEL.md",
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Compare models on the same held-out spots and seeds: FID/KID/FD, fidelity AUC, GE ablation, report."""
    from stmdit.evaluate.run import EvaluateConfig
    from stmdit.evaluate.run import evaluate as run_evaluate

    _setup_logging(verbose)
    cfg = EvaluateConfig.from_yaml(
        config,
        out=out,
        inception_weights=inception_weights,
        download_weights=download_weights or None,
        update_model_card=update_model_card or None,
    )
    results = run_evaluate(cfg)
    typer.echo(f"{'model':<16}{'setting':<12}{'FID':>10}{'FD-morph':>11}{'fidelity':>10}")
    for name, model in results["models"].items():
        for setting, res in model["settings"].items():
            s = res["summary"]
            cells = [
                "skipped" if k in results["skipped"] else s.get(k, {}).get("mean")
                for k in ("fid", "fd_morph", "fidelity_auc")
            ]
            text = "".join(
                f"{v if isinstance(v, str) else '–' if v is None else f'{v:.3f}':>{w}}"
                for v, w in zip(cells, (10, 11, 10), strict=True)
            )
            typer.echo(f"{name:<16}{setting:<12}{text}")
    # The real tiles' ceiling at each resolution a model was read at (stmdit.predictor.readback).
    for px, ceiling in results.get("ceilings", {}).items():
        typer.echo(f"{'real tiles':<16}{f'{px} px':<12}{'':>21}{ceiling['auc']:>10.3f}")
    for warning in results["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW)
    typer.echo(f"report: {Path(cfg.out) / 'report.html'} (numbers and protocol in metrics.json)")
    for name, model in results["models"].items():
        updated = f"; also written to {model['pipeline_card']}" if "pipeline_card" in model else ""
        typer.echo(f"model card of {name}: {model['model_card']}{updated}")


@command()
def pseudolabel(
    config: Annotated[
        Path,
        typer.Argument(
            help="Pseudolabel config (YAML): predictor, slides, out, geometry", exists=True, dir_okay=False
        ),
    ],
    out: Annotated[str | None, typer.Option(help="Override the config's output folder")] = None,
    verbose: Verbose = False,
) -> None:
    """Predict pseudo spatial transcriptomics for H&E-only slides (resumes; shards under accelerate launch)."""
    from stmdit.experiments.pseudolabel import PseudolabelConfig
    from stmdit.experiments.pseudolabel import pseudolabel as run_pseudolabel

    _setup_logging(verbose)
    paths = run_pseudolabel(PseudolabelConfig.from_yaml(config, out=out))
    for path in paths:
        typer.echo(str(path))


class SectionMode(str, Enum):
    seamless = "seamless"
    spots = "spots"


@command()
def section(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="Pipeline folder")],
    dataset: Annotated[Path, typer.Option(help="Prepared dataset folder")],
    sample: Annotated[str, typer.Option(help="Sample (section) to synthesize")],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder (side-by-side PNG, virtual PNG and OME-TIFF, geometry JSON, the --edit files; "
            "cache/: the seamless canvas, where a killed run resumes, or the spots-mode tiles)"
        ),
    ],
    seed: Annotated[int, typer.Option()] = 0,
    guidance_ge: Annotated[float, typer.Option(callback=_finite)] = defaults.GUIDANCE_GE,
    guidance_morph: Annotated[float, typer.Option(callback=_finite)] = defaults.GUIDANCE_MORPH,
    steps: Annotated[int, Steps] = defaults.STEPS,
    use_morphology: Annotated[bool, typer.Option(help="Also condition on each spot's real tile")] = False,
    um_per_px: Annotated[
        float | None,
        typer.Option(callback=_positive, help="Output scale (default: the generated tiles' own)"),
    ] = None,
    batch_size: Annotated[int, BatchSize] = 16,
    spatialdata: Annotated[
        Path | None, typer.Option(help="Also write a SpatialData zarr store here (needs stmdit[spatialdata])")
    ] = None,
    mode: Annotated[
        SectionMode,
        typer.Option(
            help="seamless: one canvas denoised jointly in overlapping windows; spots: a tile per spot"
        ),
    ] = SectionMode.seamless,
    stride: Annotated[
        int | None,
        typer.Option(min=1, help="Seamless: window stride in px (default about 3/4 of the window)"),
    ] = None,
    bandwidth_um: Annotated[
        float | None,
        typer.Option(
            callback=_positive, help="Seamless: expression interpolation bandwidth (default pitch / 2)"
        ),
    ] = None,
    edit: Annotated[
        Path | None,
        typer.Option(
            help="Edit config (YAML): a region (polygon_um, spots or obs), gene changes as simulate's, anchor "
            "virtual|real, band_um, seeds (they replace --seed). Redraws the region only and measures the change; writes "
            "<sample>_edit.json, .ome.tif and .png (anchor virtual: beside the first seed's unedited section)",
            dir_okay=False,
        ),
    ] = None,
    predictor: Annotated[
        Path | None,
        typer.Option(
            help="With --edit: expression predictor folder whose read-back of the region is measured"
        ),
    ] = None,
    precision: PrecisionOption = "auto",
    verbose: Verbose = False,
) -> None:
    """Whole-section virtual H&E beside the real H&E: seamless (windows denoised jointly) or a tile per spot;
    with --edit, a region redrawn under edited expression and its change measured over the edit's seeds."""
    from stmdit.sections.editing import summary_line
    from stmdit.sections.export import section_command

    _setup_logging(verbose)
    _use_precision(ctx, precision)
    paths = section_command(
        pipeline,
        dataset,
        sample,
        out,
        seed=seed,
        guidance_ge=guidance_ge,
        guidance_morph=guidance_morph,
        steps=steps,
        use_morphology=use_morphology,
        um_per_px=um_per_px,
        batch_size=batch_size,
        spatialdata=spatialdata,
        mode=mode.value,
        stride=stride,
        bandwidth_um=bandwidth_um,
        edit=edit,
        predictor=predictor,
    )
    for role, path in paths.items():
        typer.echo(f"{role}: {path}")
    if edit is not None:
        typer.echo(summary_line(json.loads(paths["edit_record"].read_text())))


@command()
def simulate(
    ctx: typer.Context,
    config: Annotated[
        Path,
        typer.Argument(
            help="Simulate config (YAML): pipeline, data, out, start state, variants",
            exists=True,
            dir_okay=False,
        ),
    ],
    out: Annotated[str | None, typer.Option(help="Override the config's output folder")] = None,
    precision: PrecisionOption = "auto",
    verbose: Verbose = False,
) -> None:
    """Virtual tissue experiment: perturb genes, generate paired counterfactuals over seeds, measure the change."""
    from stmdit.experiments.simulate import SimulateConfig, run_simulation, summary_lines

    _setup_logging(verbose)
    _use_precision(ctx, precision)
    result = run_simulation(SimulateConfig.from_yaml(config, out=out))
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(
        f"wrote {Path(result['config']['out'])}/report.html, counterfactuals.png, changes.png, simulation.json"
    )


@command()
def serve(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="Pipeline folder (e.g. outputs/demo/runs/ge/pipeline)")],
    data: Annotated[
        Path, typer.Option(help="Folder whose .h5ad files and prepared datasets the page offers")
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind; the default keeps the app on this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    gene_sets: Annotated[
        Path | None, typer.Option(help="YAML: gene set name -> gene symbols, beside the marker programmes")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Default sampling steps")] = defaults.STEPS,
    max_upload_mb: Annotated[
        float, typer.Option(callback=_positive, help="Largest .h5ad upload, in MB")
    ] = 50,
    max_spots: Annotated[int, typer.Option(min=1, help="Most spots an uploaded .h5ad may have")] = 5000,
    threads: Annotated[
        int, typer.Option(min=0, help="torch CPU threads (0: torch's default); 1 is fastest for small models")
    ] = 1,
    precision: PrecisionOption = "auto",
    verbose: Verbose = False,
) -> None:
    """Serve the virtual-experiment web page: perturb a spot's genes, compare counterfactual tiles."""
    from stmdit.genesets import load_gene_sets
    from stmdit.web.app import serve as run_server

    _setup_logging(verbose)
    _use_precision(ctx, precision)
    sets = load_gene_sets(gene_sets) if gene_sets else None
    run_server(
        pipeline,
        data,
        host=host,
        port=port,
        gene_sets=sets,
        steps=steps,
        max_upload_mb=max_upload_mb,
        max_spots=max_spots,
        cpu_threads=threads or None,
    )


@command()
def generate(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="Pipeline folder (as written by training) or hub id")],
    expression: Annotated[
        Path | None, typer.Option(help="AnnData .h5ad with raw counts (layers['counts'] or X)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for tiles and generated.h5ad")] = Path(
        "outputs/generated"
    ),
    spots: Annotated[
        str | None, typer.Option(help="Comma-separated obs names to generate (default: all)")
    ] = None,
    gene_column: Annotated[str | None, typer.Option(help="var column holding gene symbols")] = None,
    guidance_ge: Annotated[
        float, typer.Option(callback=_finite, help="Guidance scale for gene expression")
    ] = defaults.GUIDANCE_GE,
    guidance_morph: Annotated[
        float, typer.Option(callback=_finite, help="Guidance scale for morphology")
    ] = defaults.GUIDANCE_MORPH,
    steps: Annotated[int, Steps] = defaults.STEPS,
    images_per_spot: Annotated[
        int, typer.Option(min=1, help="Images per spot, each from different noise")
    ] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Spots per forward pass")] = 16,
    seed: Annotated[int, typer.Option()] = 0,
    precision: PrecisionOption = "auto",
    verbose: Verbose = False,
) -> None:
    """Generate tiles for the spots of an AnnData file (or unconditional tiles without one)."""
    from stmdit.generate import generate_tiles

    _setup_logging(verbose)
    _use_precision(ctx, precision)
    path = generate_tiles(
        pipeline,
        expression,
        out,
        spots=spots.split(",") if spots else None,
        gene_column=gene_column,
        guidance_ge=guidance_ge,
        guidance_morph=guidance_morph,
        steps=steps,
        images_per_spot=images_per_spot,
        batch_size=batch_size,
        seed=seed,
    )
    typer.echo(f"wrote {path}")


@command()
def check(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset folder")],
    repair: Annotated[
        bool,
        typer.Option(help="Unmark the damaged chunks, so that rerunning what made them rewrites just them"),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Verify a prepared dataset: every chunk there and decodable, every digest as recorded."""
    from stmdit.data.integrity import check_store

    _setup_logging(verbose)
    report = check_store(dataset, repair=repair, progress=True)
    if not report["problems"]:
        typer.echo(f"{dataset}: intact (every chunk decodes and matches its record)")
        return
    typer.echo(f"{dataset} is damaged:\n" + "\n".join(f"  {p}" for p in report["problems"]))
    if report["rerun"]:
        done = "the damaged chunks are unmarked; " if repair else f"`stmdit check {dataset} --repair`, then "
        typer.echo(
            f"To mend it: {done}rerun " + " and ".join(report["rerun"]) + " (only those chunks are redone)."
        )
    raise typer.Exit(1)


@command()
def weights() -> None:
    """Where each component's real weights come from, whether they are gated, and whether
    they are already on this machine (environment variable or hub cache)."""
    from stmdit.hub import KNOWN_WEIGHTS, locate, offline

    for src in KNOWN_WEIGHTS:
        found = locate(src)
        typer.secho(f"{src.component}: {src.name}", bold=True)
        typer.echo(f"  from:    {src.where}")
        typer.echo(f"  gated:   {src.gated}")
        typer.echo(f"  files:   {src.files}")
        typer.echo(f"  use:     {src.use}")
        if src.env:
            typer.echo(f"  env:     {src.env}=<local folder> makes it the default")
        typer.echo(f"  on this machine: {found or 'not found'}")
    typer.echo(
        f"\nHF_HUB_OFFLINE is {'set: only local folders and the hub cache are used' if offline() else 'not set'}."
    )
    typer.echo(
        "Without any of these, STMDiT runs with its weight-free encoders (panel GE, stain features, pixel space)."
    )


@command()
def version() -> None:
    """Print the versions of stmdit and the libraries it rests on."""
    import diffusers
    import torch

    import stmdit

    typer.echo(
        json.dumps(
            {"stmdit": stmdit.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
        )
    )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

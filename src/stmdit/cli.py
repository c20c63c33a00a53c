"""The ``stmdit`` command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="stmdit",
    help="Synthesize H&E tiles from spatial transcriptomics with a diffusion transformer.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


PrecisionOption = Annotated[
    str,
    typer.Option(help="Transformer compute precision: auto (bf16 where the CPU/GPU has bf16 units), fp32 or bf16"),
]


def _use_precision(ctx: typer.Context, precision: str) -> None:
    """Pipeline calls of this command run in ``precision`` (restored when the command ends)."""
    from stmdit.precision import PRECISIONS, default_precision

    if precision not in PRECISIONS:
        _fail(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    ctx.with_resource(default_precision(precision))


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for grids, curves, checkpoints and metrics.json")
    ] = Path("outputs/demo"),
    quick: Annotated[bool, typer.Option(help="Seconds-long smoke run of the same code path")] = False,
    seed: Annotated[int, typer.Option(help="Seed for simulation, training and sampling")] = 0,
    precision: PrecisionOption = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Simulate tissue, train a GE-conditioned STMDiT and a no-GE baseline, and compare them."""
    from stmdit.demo import DemoSettings, run_demo

    _setup_logging(verbose)
    settings = DemoSettings.quick() if quick else DemoSettings()
    settings.seed = seed
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


@app.command()
def train(
    config: Annotated[
        Path,
        typer.Argument(help="Training config (YAML); see README for the keys", exists=True, dir_okay=False),
    ],
    output_dir: Annotated[str | None, typer.Option(help="Override the config's output_dir")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override the config's max_steps")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir")] = True,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow encoder checkpoints that need unpickling (runs code from them)")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train an STMDiT. Works in one process or under ``accelerate launch``."""
    from stmdit.data.sources import load_training_data
    from stmdit.train import ConfigMismatchError, TrainConfig, Trainer, TrainingInterrupted

    _setup_logging(verbose)
    overrides = {k: v for k, v in (("output_dir", output_dir), ("max_steps", max_steps)) if v is not None}
    try:
        cfg = TrainConfig.from_yaml(config, **overrides)
        data = load_training_data({**cfg.data, **({"trust_pickle": True} if trust_pickle else {})}, cfg.model)
        result = Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                         vae=data.vae, val=data.val, resume=resume).run()  # fmt: skip
    except (ConfigMismatchError, ValueError) as err:
        _fail(str(err))
    except TrainingInterrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(code=130) from None
    from stmdit.distributed import process_state

    if process_state().is_main_process:
        typer.echo(f"trained to step {result.final_step}; pipeline saved to {result.pipeline_dir}")


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Read samples, tile every spot and write a prepared dataset (resumes when rerun)."""
    from stmdit.data.chunks import StoreMismatchError
    from stmdit.data.store import PrepareConfig
    from stmdit.data.store import prepare as run_prepare

    _setup_logging(verbose)
    try:
        cfg = PrepareConfig.from_yaml(config, out=out)
        store = run_prepare(cfg, restart=restart)
    except (StoreMismatchError, ValueError, FileNotFoundError, KeyError) as err:
        _fail(str(err))
    stages = store.manifest()["stages"]
    typer.echo(
        f"{store.root}: {stages['spots']['n_spots']} spots, {stages['tiles']['kept']} kept "
        f"({stages['tiles']['dropped_background']} background, {stages['tiles']['at_edge']} at the image edge)"
    )


@app.command()
def encode(
    dataset: Annotated[Path, typer.Argument(help="Prepared dataset folder")],
    ge_encoder: Annotated[str, typer.Option(help="panel | cancerfoundation[:FOLDER]")] = "panel",
    n_genes: Annotated[
        int | None, typer.Option(help="GE panel size (default: panel 256, CancerFoundation 1199)")
    ] = None,
    morphology_encoder: Annotated[
        str, typer.Option(help="stain | uni2h[:SOURCE] | timm:NAME[@WEIGHTS] | auto")
    ] = "stain",
    morphology_grid: Annotated[int, typer.Option(help="Tokens per side (4 = PixCell-1024's 4 x 4 grid)")] = 1,
    vae: Annotated[str, typer.Option(help="none (pixel space) | sd35 | VAE folder or hub id")] = "none",
    ge_tokens: Annotated[bool, typer.Option(help="Also cache per-gene GE tokens (for PMA models)")] = False,
    features: Annotated[
        str, typer.Option(help="Features to cache, comma-separated (others: on the fly)")
    ] = "latents,morphology,ge",
    batch_size: Annotated[int, typer.Option()] = 32,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow checkpoints that need unpickling (runs code from them)")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard the store's earlier features and encoders and start over")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Cache frozen-encoder features in a prepared dataset (resumes; shards under accelerate launch)."""
    from stmdit.data.chunks import StoreMismatchError
    from stmdit.data.encode import EncodeConfig
    from stmdit.data.encode import encode as run_encode

    _setup_logging(verbose)
    cfg = EncodeConfig(ge_encoder=ge_encoder, n_genes=n_genes, morphology_encoder=morphology_encoder,
                       morphology_grid=morphology_grid, vae=vae, ge_tokens=ge_tokens, batch_size=batch_size,
                       features=tuple(f for f in features.split(",") if f), trust_pickle=trust_pickle)  # fmt: skip
    try:
        store = run_encode(dataset, cfg, restart=restart)
    except (StoreMismatchError, ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    from stmdit.distributed import process_state

    if not process_state().is_main_process:
        return
    for name, info in store.manifest().get("features", {}).items():
        typer.echo(f"{name}: {tuple(info['shape'])} {info['dtype']} from {info['encoder']}")


@app.command("train-predictor")
def train_predictor(
    dataset: Annotated[
        Path, typer.Argument(help="Prepared dataset folder (train split for fitting, val for early stopping)")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the predictor (safetensors, gene list, scaler)")],
    morphology_encoder: Annotated[
        str, typer.Option(help="stain | uni2h[:SOURCE] | timm:NAME[@WEIGHTS]")
    ] = "stain",
    n_genes: Annotated[int | None, typer.Option(help="Top highly variable genes to predict [default: 5000, DeepSpot's]")] = None,
    gene_selection: Annotated[str | None, typer.Option(help="seurat_v3 (DeepSpot's, default) | variance")] = None,
    epochs: Annotated[int, typer.Option()] = 100,
    batch_size: Annotated[int, typer.Option()] = 256,
    leave_one_patient_out: Annotated[
        bool, typer.Option(help="Also fit one model per held-out patient")
    ] = False,
    seed: Annotated[int, typer.Option()] = 0,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow checkpoints that need unpickling (runs code from them)")
    ] = False,
) -> None:
    """Train the DeepSpot-style expression predictor (H&E features -> spot expression)."""
    from stmdit.predictor import train_predictor_command

    try:
        path = train_predictor_command(dataset, out, morphology_encoder=morphology_encoder, n_genes=n_genes,
                                       gene_selection=gene_selection, epochs=epochs, leave_one_patient_out=leave_one_patient_out, seed=seed,
                                       trust_pickle=trust_pickle, batch_size=batch_size)  # fmt: skip
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    typer.echo(f"predictor saved to {path}")


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Compare models on the same held-out spots and seeds: FID/KID/FD, fidelity AUC, GE ablation, report."""
    from stmdit.evaluate.run import EvaluateConfig
    from stmdit.evaluate.run import evaluate as run_evaluate

    _setup_logging(verbose)
    try:
        cfg = EvaluateConfig.from_yaml(
            config, out=out, inception_weights=inception_weights, download_weights=download_weights or None
        )
        results = run_evaluate(cfg)
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        _fail(str(err))
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
    if "ceiling" in results:
        typer.echo(f"{'real tiles':<28}{'':>21}{results['ceiling']['auc']:>10.3f}")
    for warning in results["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW)
    typer.echo(f"report: {Path(cfg.out) / 'report.html'} (numbers and protocol in metrics.json)")


@app.command()
def pseudolabel(
    config: Annotated[
        Path,
        typer.Argument(
            help="Pseudolabel config (YAML): predictor, slides, out, geometry", exists=True, dir_okay=False
        ),
    ],
    out: Annotated[str | None, typer.Option(help="Override the config's output folder")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Predict pseudo spatial transcriptomics for H&E-only slides (resumes; shards under accelerate launch)."""
    from stmdit.experiments.pseudolabel import PseudolabelConfig
    from stmdit.experiments.pseudolabel import pseudolabel as run_pseudolabel

    _setup_logging(verbose)
    try:
        paths = run_pseudolabel(PseudolabelConfig.from_yaml(config, out=out))
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    for path in paths:
        typer.echo(str(path))


@app.command()
def section(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="Pipeline folder")],
    dataset: Annotated[Path, typer.Option(help="Prepared dataset folder")],
    sample: Annotated[str, typer.Option(help="Sample (section) to synthesize")],
    out: Annotated[
        Path, typer.Option(help="Output folder (side-by-side PNG, mosaic, geometry JSON, tile cache)")
    ],
    seed: Annotated[int, typer.Option()] = 0,
    guidance_ge: Annotated[float, typer.Option()] = 2.0,
    guidance_morph: Annotated[float, typer.Option()] = 1.5,
    steps: Annotated[int, typer.Option()] = 20,
    use_morphology: Annotated[bool, typer.Option(help="Also condition on each spot's real tile")] = False,
    um_per_px: Annotated[
        float | None, typer.Option(help="Output scale (default: the generated tiles' own)")
    ] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    spatialdata: Annotated[
        Path | None, typer.Option(help="Also write a SpatialData zarr store here (needs stmdit[spatialdata])")
    ] = None,
    precision: PrecisionOption = "auto",
) -> None:
    """Whole-section virtual H&E: a tile for every spot, assembled at the spot layout beside the real H&E."""
    from stmdit.section_export import section_command

    _use_precision(ctx, precision)
    try:
        paths = section_command(pipeline, dataset, sample, out, seed=seed, guidance_ge=guidance_ge,
                                guidance_morph=guidance_morph, steps=steps, use_morphology=use_morphology,
                                um_per_px=um_per_px, batch_size=batch_size, spatialdata=spatialdata)  # fmt: skip
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    for role, path in paths.items():
        typer.echo(f"{role}: {path}")


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Virtual tissue experiment: perturb genes, generate paired counterfactuals over seeds, measure the change."""
    from stmdit.experiments.simulate import SimulateConfig, run_simulation

    _setup_logging(verbose)
    _use_precision(ctx, precision)
    try:
        result = run_simulation(SimulateConfig.from_yaml(config, out=out))
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    typer.echo(f"start: {result['start_state']}; {len(result['config']['seeds'])} seeds")
    for variant, change in result["changes"].items():
        parts = [f"{k} {c['mean_change']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
                 for k, c in change.items() if isinstance(c, dict) and "mean_change" in c]  # fmt: skip
        typer.echo(f"{variant}: " + "; ".join(parts))
    typer.echo(
        f"wrote {Path(result['config']['out'])}/report.html, counterfactuals.png, changes.png, simulation.json"
    )


@app.command()
def serve(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="Pipeline folder (e.g. outputs/demo/runs/ge/pipeline)")],
    data: Annotated[
        Path, typer.Option(help="Folder whose .h5ad files and prepared datasets the page offers")
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind; the default keeps the app on this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    gene_sets: Annotated[
        Path | None, typer.Option(help="YAML: gene set name -> gene symbols, beside the marker programmes")
    ] = None,
    steps: Annotated[int, typer.Option(help="Default sampling steps")] = 20,
    max_upload_mb: Annotated[float, typer.Option(help="Largest .h5ad upload, in MB")] = 50,
    max_spots: Annotated[int, typer.Option(help="Most spots an uploaded .h5ad may have")] = 5000,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (0: torch's default); 1 is fastest for small models")
    ] = 1,
    precision: PrecisionOption = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the virtual-experiment web page: perturb a spot's genes, compare counterfactual tiles."""
    from stmdit.genesets import load_gene_sets
    from stmdit.web.app import serve as run_server

    _setup_logging(verbose)
    _use_precision(ctx, precision)
    try:
        sets = load_gene_sets(gene_sets) if gene_sets else None
        run_server(pipeline, data, host=host, port=port, gene_sets=sets, steps=steps, max_upload_mb=max_upload_mb,
                   max_spots=max_spots, cpu_threads=threads or None)  # fmt: skip
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(str(err))


@app.command()
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
    guidance_ge: Annotated[float, typer.Option(help="Guidance scale for gene expression")] = 1.5,
    guidance_morph: Annotated[float, typer.Option(help="Guidance scale for morphology")] = 1.5,
    steps: Annotated[int, typer.Option(help="Sampling steps (DPM-Solver++)")] = 20,
    images_per_spot: Annotated[int, typer.Option(help="Images per spot, each from different noise")] = 1,
    batch_size: Annotated[int, typer.Option(help="Spots per forward pass")] = 16,
    seed: Annotated[int, typer.Option()] = 0,
    precision: PrecisionOption = "auto",
) -> None:
    """Generate tiles for the spots of an AnnData file (or unconditional tiles without one)."""
    from stmdit.generate import generate_tiles

    _use_precision(ctx, precision)
    try:
        path = generate_tiles(pipeline, expression, out, spots=spots.split(",") if spots else None,
                              gene_column=gene_column, guidance_ge=guidance_ge, guidance_morph=guidance_morph,
                              steps=steps, images_per_spot=images_per_spot, batch_size=batch_size, seed=seed)  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError, TypeError) as err:
        _fail(str(err))
    typer.echo(f"wrote {path}")


@app.command()
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


@app.command()
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

"""Batch generation for the command line: AnnData in, tiles and AnnData out."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from stmdit import defaults
from stmdit.data.readers.convention import derived_anndata, read_h5ad, write_h5ad
from stmdit.errors import InputFileError
from stmdit.io import atomic_path, path_inside


def spot_generator(seed: int, spot_index: int, image_index: int = 0) -> torch.Generator:
    """The noise of one image depends only on (seed, spot, image): reruns, other batch
    sizes and subsets of spots reproduce the same tile."""
    return torch.Generator().manual_seed(seed * 1_000_003 + spot_index * 1_009 + image_index)


def generate_tiles(
    pipeline: str | Path,
    expression: str | Path | None,
    out: str | Path,
    spots: list[str] | None = None,
    gene_column: str | None = None,
    guidance_ge: float = defaults.GUIDANCE_GE,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    steps: int = defaults.STEPS,
    images_per_spot: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    num_images: int = 8,
) -> Path:
    """Generate ``images_per_spot`` tiles per spot and write ``out/tiles/*.png`` plus
    ``out/generated.h5ad`` (the input ``obs`` with a ``tile_path`` column, one row per image)."""
    from stmdit.pipeline import STMDiTPipeline

    out = Path(out)
    if expression is not None:
        expression = Path(expression)
        if not expression.is_file():
            raise FileNotFoundError(f"expression file {expression} does not exist")
        adata = read_h5ad(expression)  # names the file when it is not a readable .h5ad
        if adata.n_obs == 0:  # checked before the pipeline loads; else a KeyError once nothing is drawn
            raise InputFileError(expression, "has no spots (obs is empty); expected one row per spot")
        if spots is not None:
            unknown = [s for s in spots if s not in adata.obs_names]
            if unknown:
                raise KeyError(f"{expression}: spots not in obs_names: {unknown[:10]}")
            adata = adata[spots].copy()
        n_spots = adata.n_obs
    else:
        adata, n_spots = None, num_images
    if not Path(pipeline).exists() and not _looks_like_hub_id(str(pipeline)):
        raise FileNotFoundError(f"pipeline folder {pipeline} does not exist (train one with `stmdit train`)")
    pipe = STMDiTPipeline.from_pretrained(str(pipeline))
    pipe.set_progress_bar_config(disable=True)
    tile_dir = out / "tiles"
    tile_dir.mkdir(parents=True, exist_ok=True)
    names = list(adata.obs_names) if adata is not None else [f"unconditional_{i}" for i in range(n_spots)]
    rows = []
    for start in tqdm(range(0, n_spots, batch_size), desc="generating", unit="batch"):
        idx = list(range(start, min(start + batch_size, n_spots)))
        gens = [spot_generator(seed, i, k) for i in idx for k in range(images_per_spot)]
        kwargs = (
            {"expression": adata[idx], "gene_column": gene_column}
            if adata is not None
            else {"num_images": len(idx)}
        )
        images = pipe(
            **kwargs,
            guidance_ge=guidance_ge,
            guidance_morph=guidance_morph,
            num_inference_steps=steps,
            num_images_per_spot=images_per_spot,
            generator=gens,
            progress=False,
        ).images
        for j, image in enumerate(images):
            spot, k = names[idx[j // images_per_spot]], j % images_per_spot
            # Spot names come from the data: "../x" or "/tmp/x" must not leave the output folder.
            path = path_inside(tile_dir, f"{spot}_{k}", suffix=".png")
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            rows.append({"spot": spot, "image_index": k, "tile_path": str(path.relative_to(out))})
    table = pd.DataFrame(rows)
    obs = table.set_index(table["spot"] + "_" + table["image_index"].astype(str))
    if adata is not None:
        obs = obs.join(adata.obs.add_prefix("source_"), on="spot")
    result = derived_anndata(obs, adata, "spot")
    result.uns["stmdit_generate"] = {
        "pipeline": str(pipeline),
        "guidance_ge": guidance_ge,
        "guidance_morph": guidance_morph,
        "steps": steps,
        "seed": seed,
        "images_per_spot": images_per_spot,
        "expression": str(expression) if expression is not None else "none (unconditional)",
    }
    target = out / "generated.h5ad"
    write_h5ad(result, target)
    return target


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` as the Hugging Face hub spells it (a local path is anything else)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and not text.startswith(".")

"""``stmdit encode``: cache every frozen feature of a prepared dataset once.

The encoders are built (and, for those fitted on data, fitted on the training split) by the
main process and saved in ``DATASET/encoders/``; a rerun reuses them, so every chunk of a
resumed or sharded run sees the same encoders. Features are written chunk by chunk with
done-markers; under ``accelerate launch`` each process takes every N-th chunk.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from stmdit.config import ConfigModel, Count
from stmdit.data.chunks import ChunkedArray
from stmdit.data.integrity import file_digest, record_digests
from stmdit.data.store import (
    DatasetStore,
    _check_parameters,
    remove_entries,
    source_files,
    verify_sources,
)
from stmdit.io import atomic_path
from stmdit.tiles import to_tensor

logger = logging.getLogger(__name__)

ENCODER_CLASSES = {
    "PanelExpressionEncoder": "stmdit.encoders.expression",
    "CancerFoundationEncoder": "stmdit.encoders.cancerfoundation",
    "StainFeatureEncoder": "stmdit.encoders.morphology",
    "TimmMorphologyEncoder": "stmdit.encoders.morphology",
    "AutoencoderKL": "diffusers",
}


FEATURES = ("latents", "morphology", "ge")


class EncodeConfig(ConfigModel):
    """Which encoders (specs of :mod:`stmdit.encoders.factory`) and which features to cache."""

    config_name: ClassVar[str] = "encode options"

    ge_encoder: str = "panel"
    n_genes: Count | None = None
    morphology_encoder: str = "stain"
    morphology_grid: Count = 1
    vae: str = "none"
    ge_tokens: bool = False
    # Which features to cache; the others are encoded on the fly during training.
    features: Annotated[tuple[Literal[FEATURES], ...], Field(strict=False)] = FEATURES
    batch_size: Count = 32
    trust_pickle: bool = False

    def parameters(self) -> dict:
        d = self.model_dump(exclude={"batch_size", "trust_pickle"})  # batching changes only round-off
        d["features"] = list(d["features"])
        return d


def _save_encoder(encoder, folder: Path) -> None:
    with atomic_path(folder) as tmp:
        encoder.save_pretrained(tmp)


def load_encoders(store: DatasetStore) -> dict:
    """The encoders saved in a store (``ge_encoder``, ``morphology_encoder``, ``vae``; absent = None)."""
    import importlib

    info = store.manifest().get("encoders", {}).get("classes", {})
    out = {}
    for name in ("ge_encoder", "morphology_encoder", "vae"):
        cls_name = info.get(name)
        if cls_name is None:
            out[name] = None
            continue
        cls = getattr(importlib.import_module(ENCODER_CLASSES[cls_name]), cls_name)
        out[name] = cls.from_pretrained(store.root / "encoders" / name).eval()
    return out


def _build_encoders(store: DatasetStore, cfg: EncodeConfig) -> dict:
    """The encoders the specs of ``cfg`` name, fitted on the training split where they need data."""
    from stmdit.encoders.factory import build_ge_encoder, build_morphology_encoder, build_vae

    adata = store.spots()
    train = store.rows("train")
    if len(train) == 0:
        raise ValueError(f"{store.root}: the training split has no kept spots; encoders are fitted on it")
    encoders = {}
    if "counts" in adata.layers:
        # CancerFoundation's panel is chosen per sample, as its tutorial's embed(batch_key="sample").
        encoders["ge_encoder"] = build_ge_encoder(
            cfg.ge_encoder,
            adata[train],
            n_genes=cfg.n_genes,
            trust_pickle=cfg.trust_pickle,
            panel_batch_key="sample_id",
        )
    else:
        logger.warning("%s has no raw counts: no GE features (H&E-only data)", store.root)
        encoders["ge_encoder"] = None
    tiles = store.tiles()
    sample = np.sort(np.random.default_rng(0).choice(train, size=min(len(train), 2048), replace=False))
    train_tiles = to_tensor(np.asarray(tiles.oindex[sample]))
    encoders["morphology_encoder"] = build_morphology_encoder(
        cfg.morphology_encoder,
        train_tiles,
        tiles.shape[1],
        trust_pickle=cfg.trust_pickle,
        grid=cfg.morphology_grid,
    )
    encoders["vae"] = build_vae(cfg.vae)
    return encoders


def _sources(store: DatasetStore, cfg: EncodeConfig) -> list[dict]:
    """What the features are computed from: the store's spots (by their path in the store, so a
    copied store keeps its record) and the weight files or folders the encoder specs name."""
    spots = {**file_digest(store.root / "spots.h5ad"), "path": "spots.h5ad"}
    candidates = []
    for spec in (cfg.ge_encoder, cfg.morphology_encoder, cfg.vae):
        arg = str(spec).partition(":")[2]
        candidates += [str(spec), arg, arg.partition("@")[2]]
    paths = [c for c in dict.fromkeys(candidates) if c and Path(c).exists()]
    return [spots] + [file_digest(p) for p in source_files(paths, exclude=store.root)]


def _verify_sources(store: DatasetStore, recorded: list[dict]) -> None:
    inside = [
        {**r, "path": str(store.root / r["path"])} if not Path(r["path"]).is_absolute() else r
        for r in recorded
    ]
    verify_sources(inside, "start over with `stmdit encode --restart`")


def _restart(store: DatasetStore) -> None:
    """Forget every feature and encoder of an earlier encode (the prepared data stays)."""
    remove_entries(store.root, ("features", "encoders"))
    manifest = store.manifest()
    for key in ("encoders", "features"):
        manifest.pop(key, None)
    manifest.get("stages", {}).pop("encode", None)
    store.write_manifest(manifest)


def _save_encoders(store: DatasetStore, encoders: dict, parameters: dict, sources: list[dict]) -> None:
    from stmdit.encoders.factory import describe

    for name, enc in encoders.items():
        if enc is not None:
            _save_encoder(enc, store.root / "encoders" / name)
    manifest = store.manifest()
    manifest["encoders"] = {
        "parameters": parameters,
        "classes": {k: type(v).__name__ for k, v in encoders.items() if v is not None},
        "describe": {k: describe(v) for k, v in encoders.items()},
        "sources": sources,
    }
    store.write_manifest(manifest)


@torch.no_grad()
def _encode_chunk(
    tiles_u8: np.ndarray,
    counts: np.ndarray | None,
    library: np.ndarray | None,
    encoders: dict,
    cfg: EncodeConfig,
    device: torch.device,
) -> dict[str, np.ndarray]:
    from stmdit.encoders.vae import encode_images

    out = {}
    images = to_tensor(tiles_u8)
    morph, lat = [], []
    for part in images.split(cfg.batch_size):
        part = part.to(device)
        morph.append(encoders["morphology_encoder"](part).float().cpu())
        if encoders["vae"] is not None:
            lat.append(encode_images(encoders["vae"], part).float().cpu())
    out["morphology"] = torch.cat(morph).numpy()
    if lat:
        out["latents"] = torch.cat(lat).numpy()
    if encoders["ge_encoder"] is not None:
        ge = encoders["ge_encoder"](torch.from_numpy(counts).to(device), torch.from_numpy(library).to(device))
        out["ge"] = ge["ge"].float().cpu().numpy()
        if cfg.ge_tokens:
            out["ge_tokens"] = ge["ge_tokens"].float().cpu().numpy()
            out["ge_mask"] = ge["ge_mask"].cpu().numpy()
    return out


def encode(
    root,
    cfg: EncodeConfig | None = None,
    progress: bool = True,
    encoders: dict | None = None,
    restart: bool = False,
) -> DatasetStore:
    """Compute and cache the features of every spot of a prepared dataset (resumable).

    ``encoders`` (keys ``ge_encoder``, ``morphology_encoder``, ``vae``) replaces the encoders
    that ``cfg``'s specs name, for models built in Python; they are saved into the store like
    any other, and the manifest records them by class. A rerun resumes only while the store's
    spots and the encoders' weight files are unchanged; ``restart`` discards the earlier
    features and encoders first.
    """
    from stmdit.distributed import process_state
    from stmdit.encoders.expression import align_to_panel

    cfg = cfg or EncodeConfig()
    state = process_state()
    store = DatasetStore(root)
    manifest = store.manifest()
    if not manifest.get("stages", {}).get("tiles"):
        raise ValueError(f"{store.root}: tiling is not finished; rerun `stmdit prepare` first")
    parameters = cfg.parameters()
    if encoders is not None:
        parameters.update(
            {k: f"given: {type(v).__name__}" for k, v in encoders.items() if k != "vae" or v is not None}
        )
    if restart and state.is_main_process:
        _restart(store)
    state.wait_for_everyone()
    manifest = store.manifest()
    _check_parameters(manifest.get("encoders", {}), "parameters", parameters, store.root)
    if manifest.get("encoders"):
        _verify_sources(store, manifest["encoders"].get("sources", []))
    if state.is_main_process and not manifest.get("encoders"):
        sources = _sources(store, cfg)  # before building: a file changing meanwhile shows on the rerun
        built = encoders if encoders is not None else _build_encoders(store, cfg)
        _save_encoders(store, built, parameters, sources)
    state.wait_for_everyone()
    encoders = load_encoders(store)
    device = state.device
    for enc in encoders.values():
        if enc is not None:
            enc.to(device)

    adata = store.spots()
    n = adata.n_obs
    chunk_rows = int(manifest["prepare"]["chunk_rows"])
    counts = library = None
    if encoders["ge_encoder"] is not None:
        counts, library, _ = align_to_panel(
            adata, encoders["ge_encoder"].genes, source=str(store.root / "spots.h5ad")
        )
    tiles = store.tiles()

    # Shapes from one encoded row, so every process creates identical arrays.
    probe = _encode_chunk(
        np.asarray(tiles[:1]),
        None if counts is None else counts[:1],
        None if library is None else library[:1],
        encoders,
        cfg,
        device,
    )
    wanted = set(cfg.features) | ({"ge_tokens", "ge_mask"} if "ge" in cfg.features else set())
    probe = {k: v for k, v in probe.items() if k in wanted}
    arrays = {}
    if state.is_main_process:
        for name, value in probe.items():
            ChunkedArray(store.feature_path(name), (n, *value.shape[1:]), value.dtype, chunk_rows)
    state.wait_for_everyone()
    for name, value in probe.items():
        arrays[name] = ChunkedArray(store.feature_path(name), (n, *value.shape[1:]), value.dtype, chunk_rows)

    shard = (state.process_index, state.num_processes)
    pending = sorted({c for a in arrays.values() for c in a.pending(shard)})
    rows_of = ChunkedArray.rows_of(n, chunk_rows)
    bar = tqdm(
        total=len(pending),
        desc=f"encoding (process {state.process_index})",
        unit="chunk",
        disable=not progress,
    )
    for chunk in pending:
        rows = rows_of(chunk)
        values = _encode_chunk(
            np.asarray(tiles[rows]),
            None if counts is None else counts[rows],
            None if library is None else library[rows],
            encoders,
            cfg,
            device,
        )
        for name, arr in arrays.items():
            if not arr.is_done(chunk):
                arr.write(chunk, values[name])
        bar.update(1)
    bar.close()
    state.wait_for_everyone()

    if state.is_main_process:
        manifest = store.manifest()
        manifest["features"] = {
            name: {
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "complete": arr.complete,
                "encoder": manifest["encoders"]["describe"][
                    "vae"
                    if name == "latents"
                    else "morphology_encoder"
                    if name == "morphology"
                    else "ge_encoder"
                ],
            }
            for name, arr in arrays.items()
        }
        record_digests(store.root, manifest, [f"features/{name}.zarr" for name in arrays])
        manifest["stages"]["encode"] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "processes": state.num_processes,
        }
        store.write_manifest(manifest)
    state.wait_for_everyone()
    return store

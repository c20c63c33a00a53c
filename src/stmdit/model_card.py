"""Model cards: the ``README.md`` of a saved pipeline, in the Hugging Face hub's convention.

A YAML header (``library_name``, ``tags``, a ``license`` to be chosen, ``datasets``) and a body
built from ``templates/model_card.md``: the components and their encoders, the training data
(samples, spot counts, source-file digests from the prepared store), the training
configuration and, once ``stmdit evaluate`` has run on the pipeline, its metrics table
(:func:`card_with_metrics`). :meth:`STMDiTPipeline.save_pretrained
<stmdit.pipeline.STMDiTPipeline.save_pretrained>` writes the card; the trainer hands it its
record through ``pipe.training_record`` (:func:`training_record`). Evaluation writes the card
with its metrics into its own report folder and leaves the pipeline's ``README.md`` alone
unless asked (``--update-model-card``): an evaluated model may sit on a read-only share, and
two evaluations of one model would race on its card.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from stmdit.io import write_text

__all__ = [
    "METRICS_END",
    "METRICS_START",
    "card_with_metrics",
    "render_model_card",
    "training_record",
    "update_model_card",
]

TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"
METRICS_START, METRICS_END = "<!-- stmdit:metrics -->", "<!-- /stmdit:metrics -->"
NO_METRICS = (
    "Not evaluated yet: `stmdit evaluate` writes this card with its metrics table into its report "
    "folder (`model_cards/`), and here with `--update-model-card`."
)
# The evaluation's summary metrics, in the order of the paper's table: (key, column title).
METRIC_COLUMNS = (
    ("fid", "FID"),
    ("kid", "KID"),
    ("fd_morph", "FD (morphology encoder)"),
    ("fidelity_auc", "fidelity AUC"),
    ("fidelity_ratio_to_ceiling", "fidelity / ceiling"),
)


def training_record(config: dict, dataset) -> dict:
    """What the card says about a training run: its configuration and, for a prepared store,
    the samples and spot counts of the split it trained on and the store's source digests."""
    record = {"config": config, "data": None}
    store = getattr(dataset, "store", None)
    if store is None:
        return record
    obs = store.obs("sample_id").iloc[dataset.indices]  # one column: not the counts of every spot
    formats = {sid: info.get("source_format", "") for sid, info in store.samples().items()}
    counts = obs["sample_id"].astype(str).value_counts().sort_index()
    record["data"] = {
        "store": store.root.name,
        "split": dataset.split,
        "n_spots": int(len(obs)),
        "samples": [
            {"sample_id": s, "spots": int(n), "source_format": formats.get(s, "")} for s, n in counts.items()
        ],
        "sources": [
            {"name": Path(f["path"]).name, "sha256": f["digest"]} for f in store.manifest().get("sources", [])
        ],
    }
    return record


def _component_rows(pipe) -> list[dict]:
    rows = []
    for name in ("transformer", "scheduler", "ge_encoder", "morphology_encoder", "vae"):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        config = dict(getattr(component, "config", {}) or {})
        keys = {
            "transformer": ("hidden_size", "depth", "num_heads", "patch_size", "sample_size", "ge_injection"),
            "scheduler": ("algorithm_type", "solver_order", "prediction_type"),
        }.get(name, ("n_genes", "output_dim", "image_size", "model_name", "latent_channels"))
        details = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
        if name == "ge_encoder" and hasattr(component, "genes"):
            details = f"{len(component.genes)} genes" + (f", {details}" if details else "")
        rows.append({"name": name, "cls": type(component).__name__, "details": details or "-"})
    return rows


def _components_from_index(folder: Path) -> list[dict]:
    """Component rows from a saved pipeline's ``model_index.json`` (no weights loaded)."""
    import json

    index = folder / "model_index.json"
    entries = json.loads(index.read_text()) if index.is_file() else {}
    return [
        {"name": name, "cls": value[1], "details": "-"}
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1]
    ]


def render_model_card(
    pipe, record: dict | None, where: str = "path/to/pipeline", metrics: str = NO_METRICS, components=None
) -> str:
    """The card's text for ``pipe`` with its training ``record`` (None: not known); without a
    pipeline, ``components`` are the rows of the components table."""
    from huggingface_hub import ModelCard, ModelCardData

    record = record or {}
    data = record.get("data")
    card_data = ModelCardData(
        library_name="diffusers",
        license="other",
        license_name="to-be-chosen",
        tags=["stmdit", "spatial-transcriptomics", "histopathology", "h&e", "diffusion", "dit"],
        datasets=[data["store"]] if data else None,
        pipeline_tag="image-to-image"
        if getattr(pipe, "morphology_encoder", None) is not None
        else "unconditional-image-generation",
    )
    config = record.get("config")
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=f"STMDiT pipeline {Path(where).name}",
        repo_or_folder=where,
        components=_component_rows(pipe) if pipe is not None else (components or []),
        data=data,
        config=yaml.safe_dump(config, sort_keys=False).strip() if config else "",
        metrics=metrics,
    )
    return str(card)


def _metrics_table(metrics: dict) -> str:
    """One row per evaluated setting (``ge``, ``null``, ``shuffled``, ``none``): mean ± std over seeds."""
    lines = [
        "| setting | " + " | ".join(title for _, title in METRIC_COLUMNS) + " |",
        "| --- |" + " ---: |" * len(METRIC_COLUMNS),
    ]
    for setting, entry in metrics.get("settings", {}).items():
        cells = []
        for key, _ in METRIC_COLUMNS:
            value = entry.get("summary", {}).get(key)
            if isinstance(value, dict) and value.get("mean") is not None:
                cells.append(f"{value['mean']:.4g} ± {value['std']:.2g}")
            elif isinstance(value, (int, float)):
                cells.append(f"{value:.4g}")
            else:
                cells.append("-")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def card_with_metrics(pipeline_dir: str | os.PathLike, metrics: dict, source: str = "") -> str | None:
    """The card of the pipeline folder ``pipeline_dir`` with ``stmdit evaluate``'s results for it
    (its entry of ``metrics.json``'s ``models``) as its metrics table, replacing an earlier table;
    the folder itself is only read. A hub id (no local folder) gives None; a folder without a
    card gets one built from its ``model_index.json``."""
    folder = Path(pipeline_dir)
    if not folder.is_dir():
        return None
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text()
    else:
        text = render_model_card(None, None, str(folder), components=_components_from_index(folder))
    table = _metrics_table(metrics)
    if source:
        table += f"\n\nFrom `stmdit evaluate` ({source}); lower is better for FID, KID and FD."
    block = f"{METRICS_START}\n{table}\n{METRICS_END}"
    pattern = re.compile(re.escape(METRICS_START) + ".*?" + re.escape(METRICS_END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return f"{text.rstrip()}\n\n## Evaluation\n\n{block}\n"


def update_model_card(
    pipeline_dir: str | os.PathLike,
    metrics: dict,
    source: str = "",
    target: str | os.PathLike | None = None,
) -> Path | None:
    """Write :func:`card_with_metrics` to ``target``, by default the pipeline's own ``README.md``
    (the one write into a pipeline folder; ``stmdit evaluate`` does it only when asked). A hub
    id (no local folder) is left alone (None)."""
    text = card_with_metrics(pipeline_dir, metrics, source)
    if text is None:
        return None
    path = Path(target) if target is not None else Path(pipeline_dir) / "README.md"
    write_text(path, text)
    return path

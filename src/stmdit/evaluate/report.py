"""The evaluation report: one HTML page with PNG figures beside ``metrics.json``.

Every number in the page appears next to its protocol; warnings (too few images for a stable
FID, non-standard Inception weights, ...) are shown above the table, not hidden.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jinja2
import numpy as np

from stmdit.io import save_figure, write_text
from stmdit.plotting import plt, save_tile_grid

# The page layout lives in templates/report.html.j2 (package data); autoescaping covers every
# name and value that comes from the user's config or data.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("stmdit.evaluate", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
METRICS = (
    ("fid", "FID", "{:.1f}"),
    ("kid", "KID", "{:.4f}"),
    ("fd_morph", "FD-morph", "{:.2f}"),
    ("fidelity_auc", "fidelity AUC", "{:.3f}"),
)


def _fmt(summary: dict, key: str, pattern: str) -> str:
    entry = summary.get(key)
    if not entry or entry.get("mean") is None:
        return "–"
    text = pattern.format(entry["mean"])
    if len(entry.get("per_seed", [])) > 1:
        text += f" ± {pattern.format(entry['std'])}"
    if entry.get("interval"):  # the fidelity AUC's 95% gene-bootstrap interval
        text += " [{}, {}]".format(*(pattern.format(v) for v in entry["interval"]))
    return text


def _ceilings(results: dict) -> list[dict]:
    """The real-tile ceilings, the store's resolution first, then coarser ones (one per
    resolution of the models: a model's ratio uses the ceiling at its own resolution)."""
    return sorted(results.get("ceilings", {}).values(), key=lambda c: -c["detail_px"])


def _ceiling_auc(ceiling: dict) -> str:
    return _fmt({"auc": {"mean": ceiling["auc"], "interval": ceiling.get("interval")}}, "auc", "{:.3f}")


def _metric_rows(results: dict) -> list[list[str]]:
    """The metrics table's rows: model, setting, one cell per metric ("skipped" where the metric
    could not be computed at all), the ratio to the ceiling, and the ceiling that ratio uses."""
    skipped = results.get("skipped", {})
    rows = []
    for ceiling in _ceilings(results):
        px = ceiling["detail_px"]
        detail = f"at the store's {px} px" if px == results["ceiling"]["detail_px"] else f"reduced to {px} px"
        rows.append(["real tiles (ceiling)", detail, "–", "–", "–", "–", _ceiling_auc(ceiling), "1.00", "–"])
    for name, model in results["models"].items():
        ceiling = model.get("ceiling")
        used = "–" if ceiling is None else f"{ceiling['auc']:.3f} ({ceiling['detail_px']} px)"
        for setting, res in model["settings"].items():
            s = res["summary"]
            cells = ["skipped" if key in skipped else _fmt(s, key, pat) for key, _, pat in METRICS]
            ratio = s.get("fidelity_ratio_to_ceiling")
            rows.append([name, setting, *cells, "–" if ratio is None else f"{ratio:.2f}", used])
    return rows


def _ablation_rows(results: dict) -> list[list[str]]:
    return [
        [name, f"{ablation} − ge", *(f"{deltas[k]:+.3f}" if k in deltas else "–" for k, _, _ in METRICS)]
        for name, model in results["models"].items()
        for ablation, deltas in model.get("ge_ablation", {}).items()
    ]


def _ood(results: dict) -> dict | None:
    ood = results.get("ood")
    if not ood:
        return None
    rows = []
    for name, summary in ood["models"].items():
        delta = ood["delta_ood"].get(name)
        rows.append(
            [
                name,
                *(_fmt(summary, key, pat) for key, _, pat in METRICS[:3]),
                "–" if delta is None else f"{delta:+.1f}",
            ]
        )
    return {**ood, "rows": rows}


def _first_protocol(results: dict) -> dict:
    for model in results["models"].values():
        for setting in model["settings"].values():
            for detail in setting["details"].values():
                overall = detail["image_metrics"]["overall"]
                return {k: v.get("protocol") for k, v in overall.items()}
    return {}


def _plot_fidelity_curves(results: dict, path: Path) -> bool:
    curves = {}
    for ceiling in _ceilings(results):
        curves[f"real tiles at {ceiling['detail_px']} px (ceiling)"] = ceiling["per_sample"]
    for name, model in results["models"].items():
        for setting in ("ge", "none"):
            res = model["settings"].get(setting)
            if res is None:
                continue
            first = next(iter(res["details"].values()))
            if "fidelity" in first:
                curves[f"{name} ({setting})"] = first["fidelity"]["per_sample"]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per_sample in curves.items():
        samples = list(per_sample.values())
        n = samples[0]["curve"]["n"]
        r = np.mean([s["curve"]["median_r"] for s in samples if s["curve"]["n"] == n], axis=0)
        auc = np.mean([s["auc"] for s in samples])
        ax.plot(n, r, marker="o", markersize=3, label=f"{label}: AUC {auc:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("top-N highly variable genes")
    ax.set_ylabel("median Pearson r (mean over test samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def _plot_gene_scatter(measured, predictions: dict, genes: list[str], chosen: list[str], path: Path) -> bool:
    if measured is None or not predictions:
        return False
    index = {g: i for i, g in enumerate(genes)}
    chosen = [g for g in chosen if g in index] or [genes[i] for i in np.argsort(-measured.var(axis=0))[:3]]
    sources = [k for k in predictions if k == "real" or k.endswith("/ge") or k.endswith("/none")]
    fig, axes = plt.subplots(
        len(chosen), len(sources), figsize=(2.6 * len(sources), 2.4 * len(chosen)), squeeze=False
    )
    for r, gene in enumerate(chosen):
        j = index[gene]
        for c, source in enumerate(sources):
            ax = axes[r, c]
            x, y = measured[:, j], predictions[source][:, j]
            ax.scatter(x, y, s=4, alpha=0.6)
            rho = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else float("nan")
            ax.set_title(f"{gene} | {source}: r={rho:.2f}", fontsize=7)
            if r == len(chosen) - 1:
                ax.set_xlabel("measured log1p CP10k", fontsize=7)
            if c == 0:
                ax.set_ylabel("predicted from tile", fontsize=7)
    save_figure(fig, path)
    return True


def _plot_ablation(results: dict, path: Path) -> bool:
    entries = [
        (name, ab, d) for name, m in results["models"].items() for ab, d in m.get("ge_ablation", {}).items()
    ]
    if not entries:
        return False
    keys = [k for k in ("fid", "fd_morph", "fidelity_auc") if any(k in d for _, _, d in entries)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    labels = [f"{n}\n{a}" for n, a, _ in entries]
    for ax, key in zip(axes[0], keys, strict=True):
        values = [d.get(key, np.nan) for _, _, d in entries]
        ax.bar(range(len(values)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(f"Δ {dict((k, lbl) for k, lbl, _ in METRICS)[key]} (ablated − ge)", fontsize=8)
    save_figure(fig, path)
    return True


def _first_seed(summary: dict, key: str) -> float | None:
    """A metric on the first seed: the guidance sweep draws only that one, so curves over the
    sweep compare every scale on the same noise (the default scale's mean has more seeds)."""
    per_seed = summary.get(key, {}).get("per_seed") or [None]
    return per_seed[0]


def _plot_sweep(results: dict, path: Path) -> bool:
    """Each metric against the GE guidance scale, on the first seed (see :func:`_first_seed`)."""
    series = {}
    for name, model in results["models"].items():
        pts = [
            (s["guidance_ge"], s["summary"])
            for key, s in model["settings"].items()
            if key == "ge" or key.startswith("ge@")
        ]
        if len(pts) > 1:
            series[name] = sorted(pts, key=lambda p: p[0])
    if not series:
        return False
    keys = [
        k
        for k in ("fid", "fd_morph", "fidelity_auc")
        if any(k in p[1] for pts in series.values() for p in pts)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, pts in series.items():
            values = [_first_seed(p[1], key) for p in pts]
            ax.plot([p[0] for p in pts], [np.nan if v is None else v for v in values], marker="o", label=name)
        ax.set_xlabel("GE guidance scale (first seed)")
        ax.set_title(dict((k, lbl) for k, lbl, _ in METRICS)[key], fontsize=8)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def _plot_tradeoff(results: dict, path: Path) -> bool:
    """Fidelity AUC against FD-morph for each model, one point per GE guidance scale (the sweep),
    a no-GE model as a single point: where realism and fidelity hold together. First seed
    throughout (see :func:`_first_seed`)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn = False
    for name, model in results["models"].items():
        pts = sorted(
            (s["guidance_ge"], s["summary"])
            for key, s in model["settings"].items()
            if key in ("ge", "none") or key.startswith("ge@")
        )
        pts = [(g, _first_seed(s, "fd_morph"), _first_seed(s, "fidelity_auc")) for g, s in pts]
        pts = [p for p in pts if None not in p]
        if not pts:
            continue
        drawn = True
        if not model["has_ge"]:
            ax.scatter([pts[0][1]], [pts[0][2]], marker="s", label=f"{name} (no GE)")
            continue
        line = ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)[0]
        for g, fd, auc in pts:
            ax.annotate(
                f"{g:g}",
                (fd, auc),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    if not drawn:
        plt.close(fig)
        return False
    for ceiling, style in zip(_ceilings(results), itertools.cycle(("--", ":", "-.")), strict=False):
        label = f"real tiles at {ceiling['detail_px']} px"
        ax.axhline(ceiling["auc"], color="grey", linestyle=style, linewidth=0.8, label=label)
    ax.set_xlabel("FD-morph to the real tiles (lower: more realistic)")
    ax.set_ylabel("fidelity AUC (higher: follows expression)")
    ax.set_title("GE guidance scales, first seed", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def write_report(
    out: Path,
    results: dict,
    real_grid: np.ndarray,
    model_grids: dict,
    held,
    measured,
    predictions,
    genes: list[str],
    scatter_genes: list[str],
) -> Path:
    """Write ``report.html`` and its PNGs into ``out``; returns the HTML path."""
    out = Path(out)
    figures = []
    rows = [("real", real_grid)] + [(name, tiles) for name, tiles in model_grids.items()]
    save_tile_grid(
        rows, out / "samples_grid.png", column_titles=[str(s) for s in held.adata.obs_names[: len(real_grid)]]
    )
    figures.append(
        (
            "samples_grid.png",
            "Real held-out tiles and each model's tile for the same spots (seed 0; "
            "GE models with the spot's measured expression).",
        )
    )
    if _plot_fidelity_curves(results, out / "fidelity_curves.png"):
        figures.append(
            (
                "fidelity_curves.png",
                "Median per-gene Pearson r of the expression predictor against the "
                "measured expression, over the top-N highly variable genes; AUC with N normalised to [0, 1].",
            )
        )
    if _plot_gene_scatter(measured, predictions, genes, scatter_genes, out / "gene_scatter.png"):
        figures.append(
            (
                "gene_scatter.png",
                "Measured expression against the expression the predictor reads off "
                "real and generated tiles, for chosen genes.",
            )
        )
    if _plot_ablation(results, out / "ge_ablation.png"):
        figures.append(
            (
                "ge_ablation.png",
                "GE ablation: metric with GE removed (null) or shuffled minus the metric "
                "with the true GE. Positive FID/FD deltas and negative fidelity deltas mean GE helps.",
            )
        )
    if _plot_sweep(results, out / "guidance_sweep.png"):
        figures.append(
            (
                "guidance_sweep.png",
                "FID (when computed), FD-morph and fidelity against the GE guidance scale.",
            )
        )

    if _plot_tradeoff(results, out / "fidelity_vs_fd.png"):
        figures.append(
            (
                "fidelity_vs_fd.png",
                "Realism against fidelity: FD in the morphology space (x, lower is "
                "more realistic) and fidelity AUC (y) for each GE guidance scale of the sweep (labels); "
                "a no-GE model is one square.",
            )
        )

    protocol = {**results["protocol"], "image_metrics": _first_protocol(results)}
    if "ceiling" in results:
        protocol["fidelity_auc"] = results["ceiling"]["protocol"]
    page = _TEMPLATES.get_template("report.html.j2").render(
        n_spots=results["n_spots"],
        samples=results["samples"],
        seeds=results["config"]["seeds"],
        steps=results["config"]["steps"],
        warnings=results.get("warnings", []),
        metric_labels=[label for _, label, _ in METRICS],
        metric_rows=_metric_rows(results),
        ceiling_rule=results["protocol"].get("ceiling") if "ceiling" in results else None,
        skipped=results.get("skipped", {}),
        ablation_rows=_ablation_rows(results),
        ood=_ood(results),
        figures=[{"file": name, "caption": caption} for name, caption in figures],
        protocol=json.dumps(protocol, indent=2, default=str),
    )
    path = out / "report.html"
    write_text(path, page)
    return path

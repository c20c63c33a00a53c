"""Warm-start an STMDiT from a PixCell (or any PixArt) transformer checkpoint.

PixCell is published in two forms: the diffusers layout on the Hugging Face hub
(``StonyBrook-CVLab/PixCell-256``: ``transformer/config.json`` and
``transformer/diffusion_pytorch_model.safetensors``, built from diffusers' PixArt parts) and the
original PixArt training checkpoints (``torch.save({"state_dict": ...})``, module names as
STMDiT's). Both are converted here to STMDiT names; every backbone tensor must land on an
STMDiT tensor of the same shape, and the GE layers keep their zero-output initial state, so
the warm-started model computes exactly what PixCell computes until GE training moves it.

Public API: :func:`load_pixcell` (file, folder or hub id -> ``(STMDiT, LoadReport)``), and
the pieces it is made of: :func:`detect_layout`, :func:`convert_diffusers`,
:func:`convert_original`; :func:`load_initial_weights`, the weights a training run starts
from (``TrainConfig.init_from``): PixCell, or an earlier STMDiT, for instance a no-GE model
given a GE pathway.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file

from stmdit.checkpoint import LoadReport, read_state_dict
from stmdit.hub import hub_snapshot, is_local
from stmdit.model import STMDiT

logger = logging.getLogger(__name__)

LAYOUTS = ("diffusers", "original")

# Buffers a checkpoint may carry that STMDiT recomputes from its config instead of loading.
_RECOMPUTED = {
    "pos_embed": "image sin-cos position table, recomputed from sample_size and interpolation_scale",
    "pos_embed.pos_embed": "image sin-cos position table, recomputed from sample_size and interpolation_scale",
    "y_pos_embed": "PixCell morphology-token position table, recomputed from morph_tokens and the patch grid",
    "y_pos_embed.y_pos_embed": "PixCell morphology-token position table, recomputed from morph_tokens and the patch grid",
}

# One-to-one renames, diffusers name -> STMDiT name (whole-key regular expressions).
_DIFFUSERS_RENAMES = (
    (r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1"),
    (r"adaln_single\.emb\.timestep_embedder\.linear_1\.(weight|bias)", r"t_embedder.mlp.0.\1"),
    (r"adaln_single\.emb\.timestep_embedder\.linear_2\.(weight|bias)", r"t_embedder.mlp.2.\1"),
    (r"adaln_single\.linear\.(weight|bias)", r"t_block.1.\1"),
    (r"caption_projection\.linear_1\.(weight|bias)", r"y_embedder.y_proj.fc1.\1"),
    (r"caption_projection\.linear_2\.(weight|bias)", r"y_embedder.y_proj.fc2.\1"),
    (r"caption_projection\.uncond_embedding", r"y_embedder.y_embedding"),
    (r"transformer_blocks\.(\d+)\.scale_shift_table", r"blocks.\1.scale_shift_table"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_q\.(weight|bias)", r"blocks.\1.cross_attn.q_linear.\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"scale_shift_table", r"final_layer.scale_shift_table"),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1"),
)
# Separate projections that STMDiT stacks on dim 0: (pattern, target, part order).
_DIFFUSERS_FUSED = (
    (r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", r"blocks.\1.attn.qkv.\3", "qkv"),
    (
        r"transformer_blocks\.(\d+)\.attn2\.to_([kv])\.(weight|bias)",
        r"blocks.\1.cross_attn.kv_linear.\3",
        "kv",
    ),
)
_GE_KEY = re.compile(r"(ge_embedder|ge_adaln)\.|blocks\.\d+\.ge_cross_attn\.")
_HUB_FILES = [
    f"{folder}{name}"
    for folder in ("", "transformer/")
    for name in ("config.json", "diffusion_pytorch_model*.safetensors")
]
_PIXART_HEAD_DIM = 72  # every PixArt / PixCell size uses 72-d heads (PixCell: 1152 = 16 x 72)
_PIXCELL_256_SAMPLE_SIZE = 32  # 256 px through the 8x SD3.5 VAE
_PIXCELL_CLASS = "PixCellTransformer2DModel"
# PixCell-256 was trained with pe_interpolation = 0.5 (PixArt's sample_size / 64); its hub
# config.json leaves interpolation_scale null, from which diffusers would build 1.
_PIXCELL_256_INTERPOLATION = 0.5


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """``"diffusers"`` or ``"original"`` from the key names; ValueError when the keys are
    neither, or both at once."""
    keys = list(state_dict)
    diffusers = any(k.startswith(("transformer_blocks.", "adaln_single.", "pos_embed.proj.")) for k in keys)
    original = any(k.startswith(("blocks.", "x_embedder.", "t_block.")) for k in keys)
    if diffusers != original:
        return "diffusers" if diffusers else "original"
    what = (
        "mixes diffusers and original PixArt names"
        if diffusers
        else "has neither diffusers nor original PixArt names"
    )
    raise ValueError(
        f"unknown checkpoint layout: the state dict {what} (first keys: {keys[:5]}); "
        f"pass layout= one of {LAYOUTS} if you know it"
    )


def convert_diffusers(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Diffusers PixArt / PixCell names -> STMDiT names, stacking q/k/v into ``attn.qkv`` and
    k/v into ``cross_attn.kv_linear``. Returns (converted, ignored); keys no rule knows pass
    through unchanged so that they surface as unexpected."""
    out, ignored, parts = {}, {}, {}
    for key, value in state_dict.items():
        if key in _RECOMPUTED:
            ignored[key] = _RECOMPUTED[key]
            continue
        for pattern, target, _ in _DIFFUSERS_FUSED:
            if m := re.fullmatch(pattern, key):
                parts.setdefault(m.expand(target), {})[m.group(2)] = value
                break
        else:
            for pattern, target in _DIFFUSERS_RENAMES:
                if m := re.fullmatch(pattern, key):
                    out[m.expand(target)] = value
                    break
            else:
                out[key] = value
    for target, got in parts.items():
        order = "qkv" if ".attn.qkv." in target else "kv"
        if set(got) != set(order):
            raise ValueError(
                f"cannot build {target}: the checkpoint has only the {sorted(got)} projections of {list(order)}"
            )
        out[target] = torch.cat([got[c] for c in order], dim=0)
    return out, ignored


def convert_original(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Original PixArt names already are STMDiT's; only the recomputed position tables are set
    aside. Returns (converted, ignored)."""
    ignored = {k: _RECOMPUTED[k] for k in state_dict if k in _RECOMPUTED}
    return {k: v for k, v in state_dict.items() if k not in ignored}, ignored


CONVERTERS = {"diffusers": convert_diffusers, "original": convert_original}


def load_pixcell(
    source: str | os.PathLike,
    ge_injection: str = "adaln+xattn",
    ge_pooling: str = "cls",
    *,
    layout: str | None = None,
    interpolation_scale: float | None = None,
    revision: str | None = None,
    state_dict_key: str | None = None,
    trust_pickle: bool = False,
    **model_overrides,
) -> tuple[STMDiT, LoadReport]:
    """Build an STMDiT with the GE pathway and load a PixCell / PixArt backbone into it.

    ``source`` is one of:

    * a diffusers-format folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
      directly or in a ``transformer/`` subfolder): the STMDiT config comes from config.json;
    * an original-format checkpoint file (``.safetensors``, or ``.pth``/``.pt``/``.ckpt``/``.bin``, read
      with ``torch.load(weights_only=True)``; files that need pickled Python objects load only
      with ``trust_pickle=True``, because unpickling runs code). A wrapped checkpoint is opened
      at ``state_dict_key``, by default the first of ``state_dict``, ``model``, ``module``,
      ``ema`` present (PixCell's and PixArt's own loaders read ``state_dict``). Without a
      config, the STMDiT config is inferred from tensor shapes, see below;
    * a Hugging Face hub id of a diffusers-format repository (e.g.
      ``StonyBrook-CVLab/PixCell-256``): only the transformer files are fetched, through the
      hub cache; ``HF_HUB_OFFLINE=1`` is honoured.

    ``layout`` (``"diffusers"`` or ``"original"``) is detected from the key names when None.
    ``interpolation_scale`` is the image position table's scale, which no weight file stores:
    None takes it from config.json (when null there: 0.5 for PixCell-256, the
    ``pe_interpolation`` it was trained with, else diffusers' ``max(sample_size // 64, 1)``)
    or, for original files, PixArt's convention ``sample_size / 64`` (0.5 for PixCell-256, as
    its training config sets; an inference for any other checkpoint); a stored ``pos_embed``
    is compared against the table built, with a warning if they differ. Original files
    without config also get ``num_heads = hidden / 72`` (PixArt's head size) and
    ``sample_size`` from the stored ``pos_embed`` or 32 (PixCell-256). ``model_overrides``
    are further :class:`STMDiT` arguments (``ge_dim``, ``num_heads``, ``sample_size``, ...)
    and win over both.

    Returns the model (eval mode, float32) and a :class:`LoadReport`, which is also logged,
    and warned about unless it is clean (a backbone tensor missing, a checkpoint tensor left
    over, or a caveat). A tensor whose shape differs from the model's raises ValueError
    naming the key.
    """
    path = _resolve(source, revision)
    config_json, state = _read_transformer(path, state_dict_key, trust_pickle)
    not_tensors = {k: "not a tensor" for k, v in state.items() if not isinstance(v, torch.Tensor)}
    state = {k: v for k, v in state.items() if k not in not_tensors}
    layout = detect_layout(state) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    overrides = {
        **model_overrides,
        **({} if interpolation_scale is None else {"interpolation_scale": interpolation_scale}),
    }
    notes = []
    if config_json is not None:
        config, notes = _config_from_diffusers(config_json, explicit=set(overrides))
    else:
        config, notes = _config_from_shapes(state, explicit=set(overrides))
    config.update(overrides, ge_injection=ge_injection, ge_pooling=ge_pooling)

    converted, ignored = CONVERTERS[layout](state)
    model = STMDiT(**config)
    report = _load_matching(model, converted, str(path), layout)
    report.ignored, report.notes, report.caveats = {**not_tensors, **ignored}, notes, _caveats(model, state)
    logger.info("%s", report)
    if not report.clean:
        warnings.warn(f"PixCell warm-start is not exact:\n{report}", stacklevel=2)
    return model, report


def source_prediction_type(init_from: str | os.PathLike) -> str | None:
    """What the ``init_from`` weights were trained to predict: epsilon for PixCell, the saved
    scheduler's ``prediction_type`` for an STMDiT pipeline folder, None when nothing says."""
    spec = str(init_from)
    if spec.startswith("pixcell:"):
        return "epsilon"
    scheduler = Path(spec).expanduser() / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        return json.loads(scheduler.read_text()).get("prediction_type", "epsilon")
    return None


def load_initial_weights(init_from: str | os.PathLike, **model_args) -> tuple[STMDiT, LoadReport]:
    """The model a training run starts from.

    ``init_from`` is ``pixcell:SOURCE`` (any source :func:`load_pixcell` takes) or the folder of
    an STMDiT pipeline (its ``transformer/``) or transformer. ``model_args`` are STMDiT
    arguments that replace the checkpoint's (the GE pathway, the data's widths); every
    checkpoint tensor must fit the resulting model, and tensors the checkpoint lacks may only
    be GE layers, which start in their zero-output state: an STMDiT without GE warm-starts a
    GE model that first computes exactly what it computed.
    """
    spec = str(init_from)
    if spec.startswith("pixcell:"):
        return load_pixcell(spec.removeprefix("pixcell:"), **model_args)
    folder = Path(spec).expanduser()
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"init_from {spec!r}: no STMDiT pipeline or transformer folder there (config.json); "
            "a PixCell checkpoint is given as pixcell:SOURCE"
        )
    pretrained = STMDiT.from_pretrained(folder)
    config = {k: v for k, v in pretrained.config.items() if not k.startswith("_")}
    model = STMDiT(**{**config, **model_args})
    report = _load_matching(model, pretrained.state_dict(), str(folder), "stmdit")
    if report.missing or report.unexpected:
        raise ValueError(f"init_from {spec!r} does not fit the configured model:\n{report}")
    logger.info("%s", report)
    return model, report


def _load_matching(model: STMDiT, state: dict[str, torch.Tensor], source: str, layout: str) -> LoadReport:
    """Load the tensors of ``state`` that ``model`` has (shapes must agree) and report the rest."""
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and value.shape != expected[key].shape:
            raise ValueError(
                f"shape mismatch for {key!r} ({layout} layout, {source}): the checkpoint has "
                f"{tuple(value.shape)}, STMDiT built from the config expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.eval()
    left = sorted(k for k in expected if k not in state)
    return LoadReport(
        source=source,
        layout=layout,
        config=dict(model.config),
        loaded=sorted(k for k in state if k in expected),
        initial=[k for k in left if _GE_KEY.match(k)],
        missing=[k for k in left if not _GE_KEY.match(k)],
        unexpected=sorted(k for k in state if k not in expected),
    )


def _resolve(source: str | os.PathLike, revision: str | None) -> Path:
    """A local path as is; otherwise a hub id, fetched (transformer files only) into the hub cache."""
    if is_local(source):
        return Path(source).expanduser()
    return hub_snapshot(str(source), allow_patterns=_HUB_FILES, revision=revision)


def _read_transformer(path: Path, state_dict_key: str | None, trust_pickle: bool) -> tuple[dict | None, dict]:
    """(config.json contents or None, flat state dict) from a diffusers folder or a file."""
    if path.is_dir():
        for folder in (path, path / "transformer"):
            shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
            if (folder / "config.json").is_file() and shards:
                state = {}
                for shard in shards:
                    state.update(load_file(shard))
                return json.loads((folder / "config.json").read_text()), state
        raise FileNotFoundError(
            f"{path} is not a diffusers model folder: expected config.json and diffusion_pytorch_model*.safetensors "
            "in it or in its transformer/ subfolder"
        )
    if path.suffix not in {".safetensors", ".pth", ".pt", ".ckpt", ".bin"}:
        raise ValueError(
            f"unsupported checkpoint file {path.name}: expected .safetensors, .pth, .pt, .ckpt or .bin"
        )
    return None, read_state_dict(path, trust_pickle, state_dict_key)


def _config_from_diffusers(cfg: dict, explicit: set[str] = frozenset()) -> tuple[dict, list[str]]:
    """STMDiT arguments from a diffusers PixArt / PixCell config.json, plus notes on values the
    file leaves open; missing keys take PixArtTransformer2DModel's defaults, as diffusers itself
    would, except a null ``interpolation_scale`` of PixCell-256, which takes the 0.5 it was
    trained with. The ones in ``explicit`` are about to be overridden and get no note."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(PixArtTransformer2DModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    cfg = {**defaults, "caption_num_tokens": 1, **cfg}
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    additional = cfg["use_additional_conditions"]
    unsupported = {
        "norm_type": (cfg["norm_type"], "ada_norm_single"),
        "activation_fn": (cfg["activation_fn"], "gelu-approximate"),
        "norm_elementwise_affine": (cfg["norm_elementwise_affine"], False),
        "attention_bias": (cfg["attention_bias"], True),
        "use_additional_conditions": (cfg["sample_size"] == 128 if additional is None else additional, False),
        "cross_attention_dim": (cfg["cross_attention_dim"] or hidden, hidden),
    }
    bad = {k: got for k, (got, want) in unsupported.items() if got != want}
    if bad or cfg["caption_channels"] is None:
        needed = {k: want for k, (_, want) in unsupported.items()}
        raise ValueError(
            f"config.json describes a model STMDiT cannot hold: {bad or 'caption_channels is null'} "
            f"(STMDiT needs {needed} and caption_channels set)"
        )
    scale, notes = cfg["interpolation_scale"], []
    if (
        scale is None
        and cfg.get("_class_name") == _PIXCELL_CLASS
        and cfg["sample_size"] == _PIXCELL_256_SAMPLE_SIZE
    ):
        scale = _PIXCELL_256_INTERPOLATION
        notes.append(
            f"config.json leaves interpolation_scale null: PixCell-256's pe_interpolation {scale} used (its "
            "training setting; diffusers would build 1); pass interpolation_scale= to override"
        )
    elif scale is None:
        scale = max(cfg["sample_size"] // 64, 1)
        notes.append(
            f"config.json leaves interpolation_scale null: diffusers' max(sample_size // 64, 1) = {scale} used"
        )
    if "interpolation_scale" in explicit:
        notes = []
    config = {
        "sample_size": cfg["sample_size"],
        "patch_size": cfg["patch_size"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"] or cfg["in_channels"],
        "hidden_size": hidden,
        "depth": cfg["num_layers"],
        "num_heads": cfg["num_attention_heads"],
        "morph_dim": cfg["caption_channels"],
        "morph_tokens": cfg["caption_num_tokens"],
        "norm_eps": cfg["norm_eps"],
        "interpolation_scale": scale,
    }
    return config, notes


def _config_from_shapes(state: dict[str, torch.Tensor], explicit: set[str]) -> tuple[dict, list[str]]:
    """STMDiT arguments inferred from an original-layout state dict, plus notes on the values
    that shapes cannot give (the ones in ``explicit`` are about to be overridden)."""

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise ValueError(
                f"cannot infer the model config: the checkpoint has no {key!r}; is it a PixArt transformer?"
            )
        return state[key].shape

    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    notes = []
    if "pos_embed" in state:
        sample_size = math.isqrt(state["pos_embed"].shape[-2]) * patch
    else:
        sample_size = _PIXCELL_256_SAMPLE_SIZE
        if "sample_size" not in explicit:
            notes.append(f"sample_size not in the checkpoint: PixCell-256's {sample_size} assumed")
    config = {
        "sample_size": sample_size,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": shape("final_layer.linear.weight")[0] // patch**2,
        "hidden_size": hidden,
        "depth": depth,
        "mlp_ratio": shape("blocks.0.mlp.fc1.weight")[0] / hidden,
        "morph_dim": shape("y_embedder.y_proj.fc1.weight")[1],
        "morph_tokens": state["y_embedder.y_embedding"].shape[0] if "y_embedder.y_embedding" in state else 1,
        "interpolation_scale": sample_size / 64,
    }
    if "num_heads" not in explicit:
        if hidden % _PIXART_HEAD_DIM:
            raise ValueError(
                f"cannot infer num_heads: hidden size {hidden} is not a multiple of PixArt's head size "
                f"{_PIXART_HEAD_DIM}; pass num_heads="
            )
        config["num_heads"] = hidden // _PIXART_HEAD_DIM
        notes.append(
            f"num_heads not in the checkpoint: {config['num_heads']} assumed (head size {_PIXART_HEAD_DIM})"
        )
    if "interpolation_scale" not in explicit:
        notes.append(
            f"interpolation_scale not in the checkpoint: {config['interpolation_scale']} assumed (PixArt's "
            "sample_size / 64); pass interpolation_scale= if the checkpoint was trained otherwise"
        )
    return config, notes


def _caveats(model: STMDiT, state: dict[str, torch.Tensor]) -> list[str]:
    """Known reasons why the loaded model would not reproduce the checkpoint's own outputs."""
    caveats = []
    stored = state.get("pos_embed", state.get("pos_embed.pos_embed"))
    if stored is not None and stored.shape == model.pos_embed.shape:
        diff = (stored.float() - model.pos_embed).abs().max().item()
        if diff > 1e-3:
            caveats.append(
                f"the checkpoint's stored pos_embed differs from the table built with "
                f"interpolation_scale={model.config.interpolation_scale} (max abs difference {diff:.3g}); "
                "pass the interpolation_scale the checkpoint was trained with"
            )
    return caveats

"""Training loop on HuggingFace ``accelerate``.

One process or many (``accelerate launch --num_processes N``): AdamW with warm-up, gradient
clipping, EMA weights, mixed precision, TensorBoard scalars, periodic sample grids, and
checkpoints that are written atomically and resume exactly.

Exact resume rests on one rule: all randomness of step ``s`` (the batch, the timesteps, the
noise, the modality-dropout masks) is derived from ``(seed, s, process)``. A checkpoint
therefore only needs the weights, the EMA, the optimizer and LR-schedule state and the step;
a resumed run then reproduces the losses of an uninterrupted one.

Checkpoints hold no pickled objects: weights are safetensors, the optimizer state is a
tensor dict loaded with ``torch.load(weights_only=True)``, the rest is JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from pydantic import Discriminator, Field, Tag
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stmdit import defaults
from stmdit.config import (
    ConfigModel,
    Count,
    NonNegativeFloat,
    NonNegativeInt,
    PathStr,
    PositiveFloat,
    Probability,
)
from stmdit.data.features import FeatureDataset, batch_condition, collate_batch
from stmdit.data.loading import ACCESS, DEFAULT_ACCESS, split_steps
from stmdit.diffusion import (
    DEFAULT_P_DROP_BOTH,
    DEFAULT_P_DROP_GE,
    DEFAULT_P_DROP_MORPHOLOGY,
    PREDICTION_TYPES,
    X0_THRESHOLDS,
    ModalityDropout,
    make_sampling_scheduler,
    make_training_scheduler,
    sample,
    training_loss,
)
from stmdit.distributed import cpu_process_group, process_state
from stmdit.encoders.vae import decode_latents
from stmdit.errors import StmditError, TrainingDiverged
from stmdit.io import (
    atomic_path,
    differences,
    remove_stale_temporaries,
    save_torch,
    write_json,
    write_text,
    writing,
    writing_tensors,
)
from stmdit.model import GE_INJECTIONS, GE_POOLINGS, PRESETS, STMDiT
from stmdit.model_card import training_record

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
# Keys that may change between a run and its resume without changing what is computed.
RESUME_FREE_KEYS = {
    "output_dir",
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "log_every",
    "num_workers",
}


class ConfigMismatchError(StmditError, ValueError):
    """A resume folder was written by a run with a different configuration."""


class CorruptCheckpointError(StmditError, RuntimeError):
    """A checkpoint cannot be read (a crash during its save, a damaged disk)."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after writing a checkpoint; rerun to resume."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(
            f"training interrupted at step {step}; checkpoint {checkpoint} written, rerun to resume"
        )
        self.step, self.checkpoint = step, checkpoint


class SyntheticDataSpec(ConfigModel):
    """``data`` with ``source: synthetic``: the embedded tissue simulator; the keys are the
    arguments of :func:`stmdit.data.sources.prepare_synthetic` (its defaults apply)."""

    tag: ClassVar[str] = "synthetic"
    source: Literal["synthetic"] = "synthetic"
    n_sections: Annotated[int, Field(ge=2)] | None = None
    grid: Count | None = None
    tile_size: Annotated[int, Field(ge=4)] | None = None
    n_genes: Count | None = None
    seed: int | None = None
    ge_encoder: str | None = None
    morphology_encoder: str | None = None
    vae: str | None = None
    ge_tokens: bool | None = None
    trust_pickle: bool | None = None


class StoreDataSpec(ConfigModel):
    """``data`` with ``source: store``: a dataset written by ``stmdit prepare`` (and ``encode``)."""

    tag: ClassVar[str] = "store"
    source: Literal["store"]
    path: PathStr
    split: str = "train"
    val_split: str = "val"
    # How batches are read (stmdit.data.loading): auto = in memory when they fit, else blocks.
    access: Literal[ACCESS] = DEFAULT_ACCESS


def _data_source(value) -> str:
    if isinstance(value, dict):
        return value.get("source", "synthetic")
    return getattr(value, "source", "synthetic")


DataSpec = Annotated[
    Annotated[SyntheticDataSpec, Tag("synthetic")] | Annotated[StoreDataSpec, Tag("store")],
    Discriminator(
        _data_source,
        custom_error_type="data_source",
        custom_error_message="source must be 'synthetic' or 'store'",
    ),
]


class ModelSpec(ConfigModel):
    """``model``: a size ``preset`` plus any :class:`~stmdit.model.STMDiT` constructor argument
    to override. Entries that the data decides (channels, sample size, feature widths) are
    filled in from it and, when given, must agree with it."""

    preset: Literal[tuple(PRESETS)] = "tiny"
    sample_size: Count | None = None
    patch_size: Count | None = None
    in_channels: Count | None = None
    out_channels: Count | None = None
    hidden_size: Count | None = None
    depth: Count | None = None
    num_heads: Count | None = None
    mlp_ratio: PositiveFloat | None = None
    morph_dim: Count | None = None
    morph_tokens: Count | None = None
    ge_injection: Literal[GE_INJECTIONS] | None = None
    ge_pooling: Literal[GE_POOLINGS] | None = None
    ge_dim: Count | None = None
    ge_token_dim: Count | None = None
    pma_seeds: Count | None = None
    interpolation_scale: PositiveFloat | None = None
    norm_eps: PositiveFloat | None = None

    def arguments(self) -> dict:
        """The constructor arguments given (the preset supplies the others)."""
        return self.model_dump(exclude_unset=True, exclude={"preset"})


class TrainConfig(ConfigModel):
    """Everything that defines a training run; saved as ``config.yaml`` in the run folder.

    ``data`` says where the training features come from (read by
    :func:`stmdit.data.sources.load_training_data`; the trainer itself takes a dataset).
    ``model`` holds STMDiT constructor arguments plus ``preset`` (default ``tiny``); the
    channel count, sample size and feature widths are filled in from the data.
    ``init_from`` starts from existing weights instead of a random initialisation:
    ``pixcell:SOURCE`` (hub id, diffusers folder or original checkpoint) or an STMDiT
    pipeline or transformer folder; the checkpoint then decides the architecture, ``model``
    sets the GE pathway, and the new GE layers start at zero (see
    :func:`stmdit.warmstart.load_initial_weights`).
    Defaults follow PixCell where it has one (dropout 0.1, AdamW); the learning rate, warm-up
    and clipping defaults suit training from scratch rather than PixCell's fine-tuning values
    (lr 2e-5, 1000 warm-up steps, clip 0.01).
    """

    config_name: ClassVar[str] = "training config"

    output_dir: PathStr = "runs/stmdit"
    data: DataSpec = Field(default_factory=SyntheticDataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    init_from: str | None = None
    max_steps: Count = 1000
    batch_size: Count = 32
    learning_rate: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 100
    lr_schedule: Literal[tuple(s.value for s in SchedulerType)] = "constant_with_warmup"
    grad_clip: NonNegativeFloat = 1.0
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    # None: diffusers' EMA warm-up, decay min(ema_decay, (1 + step) / (10 + step)), an average
    # over about the last 10% of the steps. A power p: min(ema_decay, 1 - (1 + step)^-p), a
    # longer average (p = 3/4, diffusers' advice for short runs: about the last quarter at 400
    # steps; p = 1 is the plain mean of all steps).
    ema_power: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    p_drop_morphology: Probability = DEFAULT_P_DROP_MORPHOLOGY
    p_drop_ge: Probability = DEFAULT_P_DROP_GE
    # Both modalities dropped together, on top of the independent drops (ModalityDropout).
    p_drop_both: Probability = DEFAULT_P_DROP_BOTH
    vlb_weight: NonNegativeFloat = 0.0
    # Min-SNR loss weighting (stmdit.diffusion.training_loss); None: PixArt's plain MSE.
    min_snr_gamma: PositiveFloat | None = None
    # What the transformer predicts: PixArt's epsilon, or v (stmdit.diffusion); saved with the
    # pipeline's scheduler, so sampling follows it.
    prediction_type: Literal[PREDICTION_TYPES] = "epsilon"
    checkpoint_every: Count = 500
    keep_checkpoints: Count = 3
    sample_every: NonNegativeInt = 0
    sample_spots: Count = 8
    sample_steps: Count = defaults.STEPS
    # Pixel space: how the DDIM sampler of the sample grids and the saved pipeline bounds its x0
    # predictions (stmdit.diffusion.make_sampling_scheduler).
    x0_threshold: Literal[X0_THRESHOLDS] = defaults.X0_THRESHOLD
    guidance_morph: float = defaults.GUIDANCE_MORPH
    guidance_ge: float = defaults.GUIDANCE_GE
    log_every: Count = 10
    num_workers: NonNegativeInt = 0
    seed: int = 0

    def to_dict(self) -> dict:
        """Plain values; ``data`` and ``model`` hold the keys that were given (their defaults
        live in :func:`~stmdit.data.sources.prepare_synthetic` and the presets)."""
        out = self.model_dump(exclude={"data", "model"})
        out["data"] = {"source": self.data.source, **self.data.model_dump(exclude_unset=True)}
        out["model"] = {"preset": self.model.preset, **self.model.arguments()}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def build_model(config: TrainConfig, dataset: FeatureDataset) -> STMDiT:
    """STMDiT from the config's ``model`` section, with data-determined entries filled in."""
    spec = config.model.arguments()
    preset = config.model.preset
    from_data = dataset.model_kwargs()
    for key, value in from_data.items():
        if key in spec and spec[key] != value:
            raise ValueError(f"model.{key} is {spec[key]} in the config but the training data has {value}")
    spec = {**from_data, **spec}
    if spec.get("ge_injection", "adaln+xattn") != "none":
        needed = "ge_dim" if spec.get("ge_pooling", "cls") == "cls" else "ge_token_dim"
        if needed not in from_data:
            raise ValueError(
                f"the model injects gene expression but the training data has no {needed[:-4] or 'ge'} features"
            )
    if config.init_from is None:
        return STMDiT.from_preset(preset, **spec)
    from stmdit.warmstart import load_initial_weights, source_prediction_type

    model, _ = load_initial_weights(config.init_from, **spec)
    source = source_prediction_type(config.init_from)
    if source is not None and source != config.prediction_type:
        # Allowed (a fine-tune can change the target), but step 0 no longer computes what the
        # checkpoint computed, which a user warm-starting to keep PixCell's output would expect.
        logger.warning(
            "init_from %s was trained to predict %s; prediction_type %s retrains it for another "
            "target, so it starts from outputs that mean something else",
            config.init_from,
            source,
            config.prediction_type,
        )
    return model


def make_ema(parameters, config: TrainConfig) -> EMAModel:
    """The EMA of the weights that the pipeline is saved with (``ema_decay``, ``ema_power``)."""
    if config.ema_power is None:
        return EMAModel(parameters, decay=config.ema_decay)
    return EMAModel(
        parameters, decay=config.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=config.ema_power
    )


def _step_seed(seed: int, step: int, process: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{process}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def _config_digest(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE_KEYS}


def find_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of a crashed save are ignored)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    losses: list[tuple[int, float]]
    pipeline_dir: Path


class Trainer:
    """Train an STMDiT on a :class:`FeatureDataset`.

    ``ge_encoder``, ``morphology_encoder`` and ``vae`` are the frozen components that
    produced the features; they are saved with the final pipeline (``run/pipeline``) so that
    sampling uses the same genes and encoders. ``val`` supplies the spots of the periodic
    sample grids (the first ``sample_spots`` rows; default: the training set).
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: FeatureDataset,
        *,
        ge_encoder=None,
        morphology_encoder=None,
        vae=None,
        val: FeatureDataset | None = None,
        resume: bool = True,
        progress: bool = True,
    ):
        self.config = config
        self.dataset = dataset
        self.val = val if val is not None else dataset
        self.ge_encoder, self.morphology_encoder, self.vae = ge_encoder, morphology_encoder, vae
        self.resume = resume
        self.progress = progress
        self.run_dir = Path(config.output_dir)
        self._stop_requested = False

    # -- checkpoints ----------------------------------------------------------------------

    def _check_resume_config(self) -> None:
        saved = self.run_dir / "config.yaml"
        if not saved.exists():
            raise ConfigMismatchError(
                f"{self.run_dir} has checkpoints but no config.yaml; it is not a training run folder"
            )
        old = _config_digest(yaml.safe_load(saved.read_text()) or {})
        new = _config_digest(self.config.to_dict())
        diffs = differences(old, new)
        if diffs:
            raise ConfigMismatchError(
                f"cannot resume {self.run_dir}: it was trained with a different configuration ({'; '.join(diffs)}). "
                "Use another output_dir, or pass resume=False / --no-resume to start over."
            )

    def _save_checkpoint(
        self, step: int, model, optimizer, lr_scheduler, ema: EMAModel, accelerator: Accelerator
    ) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = self.run_dir / "checkpoints" / f"step_{step:08d}"
            with atomic_path(final) as tmp, writing_tensors(final):
                tmp.mkdir()
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(tmp / "transformer", safe_serialization=True)
                names = [n for n, _ in unwrapped.named_parameters()]
                save_file(
                    {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params, strict=True)},
                    tmp / "ema.safetensors",
                )
                state = {
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "ema_optimization_step": torch.tensor(ema.optimization_step),
                    "torch_rng": torch.get_rng_state(),
                }
                if accelerator.scaler is not None:
                    state["grad_scaler"] = accelerator.scaler.state_dict()
                save_torch(state, tmp / "training_state.pt")
                write_json(
                    tmp / "trainer_state.json",
                    {"step": step, "processes": accelerator.num_processes, "config": self.config.to_dict()},
                )
            for old in find_checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _load_checkpoint(
        self, path: Path, model, optimizer, lr_scheduler, ema: EMAModel, accelerator: Accelerator
    ) -> int:
        try:
            step = json.loads((path / "trainer_state.json").read_text())["step"]
            weights = load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")
            ema_weights = load_file(path / "ema.safetensors")
            state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # any failure to read a checkpoint means it cannot be resumed from
            raise CorruptCheckpointError(
                f"checkpoint {path} is incomplete or corrupt ({type(err).__name__}: {err})"
            ) from err
        unwrapped = accelerator.unwrap_model(model)
        missing = set(n for n, _ in unwrapped.named_parameters()) - set(weights)
        if missing:
            raise CorruptCheckpointError(f"checkpoint {path} lacks parameters {sorted(missing)[:5]}")
        unwrapped.load_state_dict(weights, strict=False)
        names = [n for n, _ in unwrapped.named_parameters()]
        for shadow, name in zip(ema.shadow_params, names, strict=True):
            shadow.copy_(ema_weights[name])
        ema.optimization_step = int(state["ema_optimization_step"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if accelerator.scaler is not None and "grad_scaler" in state:
            accelerator.scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["torch_rng"])
        return int(step)

    def _resume(self, checkpoints: list[Path], model, optimizer, lr_scheduler, ema, accelerator) -> int:
        """Load the newest intact checkpoint; corrupt newer ones are reported and set aside
        (renamed ``*.corrupt``) so that later saves and resumes pass them by."""
        corrupt = []
        for path in reversed(checkpoints):
            try:
                step = self._load_checkpoint(path, model, optimizer, lr_scheduler, ema, accelerator)
            except CorruptCheckpointError as err:
                logger.warning("%s; trying the one before it", err)
                corrupt.append(path)
                continue
            logger.info("resumed %s at step %d", path, step)
            break
        else:
            raise CorruptCheckpointError(
                f"{self.run_dir}: no intact checkpoint to resume from ({len(corrupt)} corrupt: "
                f"{', '.join(p.name for p in corrupt)}); rerun with --no-resume to start over"
            )
        accelerator.wait_for_everyone()
        if corrupt and accelerator.is_main_process:
            for path in corrupt:
                path.rename(path.with_name(path.name + ".corrupt"))
                logger.warning("resumed from %s; set %s aside as %s.corrupt", path.name, path.name, path.name)
        accelerator.wait_for_everyone()
        return step

    # -- sampling grids and final pipeline ---------------------------------------------

    def _sample_grid(self, step: int, model, ema: EMAModel) -> None:
        from stmdit.plotting import save_tile_grid

        n = min(self.config.sample_spots, len(self.val))
        batch = _on_device(self.val, self.val.batch(list(range(n))), next(model.parameters()).device)
        params = list(model.parameters())
        ema.store(params)
        ema.copy_to(params)
        try:
            model.eval()
            cond = batch_condition(batch, use_ge=model.has_ge)
            gen = torch.Generator().manual_seed(self.config.seed)
            latents = sample(
                model,
                make_sampling_scheduler(
                    self._noise_scheduler(model),
                    pixel_space=self.vae is None,
                    x0_threshold=self.config.x0_threshold,
                ),
                cond,
                guidance_morph=self.config.guidance_morph,
                guidance_ge=self.config.guidance_ge,
                num_inference_steps=self.config.sample_steps,
                generator=gen,
                progress=False,
                precision="bf16" if self.config.mixed_precision == "bf16" else "fp32",
            )
        finally:
            ema.restore(params)
            model.train()
        real = decode_latents(self.vae, batch["latents"])
        fake = decode_latents(self.vae, latents)
        save_tile_grid(
            [("real", real), (f"step {step}", fake)], self.run_dir / "samples" / f"step_{step:08d}.png"
        )

    def _noise_scheduler(self, model: STMDiT):
        return make_training_scheduler(
            learned_variance=model.learns_variance, prediction_type=self.config.prediction_type
        )

    def _save_pipeline(self, model, ema: EMAModel) -> Path:
        from stmdit.pipeline import STMDiTPipeline

        final = STMDiT.from_config(model.config)
        final.load_state_dict(model.state_dict())
        ema.copy_to(final.parameters())
        pipe = STMDiTPipeline(
            transformer=final,
            scheduler=make_sampling_scheduler(
                self._noise_scheduler(final),
                pixel_space=self.vae is None,
                x0_threshold=self.config.x0_threshold,
            ),
            ge_encoder=self.ge_encoder,
            morphology_encoder=self.morphology_encoder,
            vae=self.vae,
        )
        pipe.training_record = training_record(self.config.to_dict(), self.dataset)
        target = self.run_dir / "pipeline"
        with atomic_path(target) as tmp, writing_tensors(target):
            pipe.save_pretrained(tmp)
        return target

    # -- the loop ------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        logger.warning("signal %s: finishing this step, writing a checkpoint, then stopping", signum)
        self._stop_requested = True

    def run(self) -> TrainResult:
        cfg = self.config
        _allow_new_precision(cfg.mixed_precision)
        process_state()  # forms the process group (gloo on CPUs) before accelerate would without it
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cpu_process_group(),
            log_with="tensorboard",
            project_dir=str(self.run_dir),
        )
        device = accelerator.device
        if accelerator.is_main_process:
            for stale in remove_stale_temporaries(self.run_dir, self.run_dir / "checkpoints"):
                logger.warning("removed %s, left by an interrupted save", stale)
        accelerator.wait_for_everyone()
        existing = find_checkpoints(self.run_dir)
        if existing and self.resume:
            self._check_resume_config()
        elif existing and accelerator.is_main_process:
            for old in existing:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_text(self.run_dir / "config.yaml", cfg.to_yaml())

        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        model = build_model(cfg, self.dataset)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        noise_scheduler = self._noise_scheduler(model)
        dropout = ModalityDropout(cfg.p_drop_morphology, cfg.p_drop_ge, cfg.p_drop_both)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # Stepped once per optimisation step by us (accelerate would step it once per process).
        lr_scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
        ema = make_ema(model.parameters(), cfg)
        model, optimizer = accelerator.prepare(model, optimizer)
        ema.to(device)

        start_step = 0
        losses_path = self.run_dir / "losses.jsonl"
        history: list[tuple[int, float]] = []
        if existing and self.resume:
            start_step = self._resume(existing, model, optimizer, lr_scheduler, ema, accelerator)
            if losses_path.exists():
                history = [
                    (r["step"], r["loss"])
                    for r in map(json.loads, losses_path.read_text().splitlines())
                    if r["step"] < start_step
                ]
        # accelerate's tensorboard tracker writes its event file from a thread: a failed write
        # comes back at the next log call or at end_training, without a file name.
        board = self.run_dir / "tensorboard"
        if accelerator.is_main_process:
            write_text(losses_path, "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in history))
            with writing(board):
                accelerator.init_trackers("tensorboard")

        sampler = self.dataset.batch_sampler(
            cfg.batch_size,
            cfg.seed,
            start_step=start_step,
            max_steps=cfg.max_steps,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
        # Batches are fetched by __getitems__ (one call per request of one or several steps, cut
        # into steps by split_steps), in worker processes if asked.
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=collate_batch,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
        )
        unwrapped = accelerator.unwrap_model(model)
        use_ge = unwrapped.has_ge
        previous = (
            {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            if accelerator.is_local_main_process
            else {}
        )
        for s in previous:
            signal.signal(s, self._request_stop)
        bar = tqdm(
            total=cfg.max_steps,
            initial=start_step,
            desc=f"training {self.run_dir.name}",
            disable=not (self.progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        done = start_step
        window: list[float] = []
        model.train()
        try:
            with (
                # The loss log's appends, flushes and close (the other writes below name their own files).
                writing(losses_path),
                open(losses_path, "a")
                if accelerator.is_main_process
                else contextlib.nullcontext() as loss_log,
            ):
                per_step = cfg.batch_size // accelerator.num_processes
                for step, raw in enumerate(split_steps(loader, per_step), start=start_step):
                    batch = _on_device(self.dataset, raw, device)
                    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, accelerator.process_index))
                    with accelerator.autocast():
                        out = training_loss(
                            model,
                            noise_scheduler,
                            batch["latents"],
                            batch_condition(batch, use_ge),
                            dropout,
                            gen,
                            cfg.vlb_weight,
                            cfg.min_snr_gamma,
                        )
                    accelerator.backward(out["loss"])
                    if cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    ema.step(unwrapped.parameters())

                    loss = accelerator.reduce(out["loss"].detach(), reduction="mean").item()
                    if not math.isfinite(loss):
                        raise TrainingDiverged(
                            f"{self.run_dir}: the training loss became {loss} at step {step} "
                            f"(learning_rate {cfg.learning_rate:g}); lower learning_rate (or lengthen "
                            "warmup_steps) and rerun with --no-resume to start over"
                        )
                    window.append(loss)
                    done = step + 1
                    if accelerator.is_main_process:
                        loss_log.write(json.dumps({"step": step, "loss": loss}) + "\n")
                        history.append((step, loss))
                        bar.update(1)
                        if done % cfg.log_every == 0 or done == cfg.max_steps:
                            loss_log.flush()
                            mean = sum(window) / len(window)
                            with writing(board):
                                accelerator.log(
                                    {"loss": mean, "lr": lr_scheduler.get_last_lr()[0]}, step=done
                                )
                            bar.set_postfix(loss=f"{mean:.4f}")
                            window = []
                    stop = self._stop_requested_anywhere(accelerator)
                    if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or stop:
                        if accelerator.is_main_process:
                            loss_log.flush()
                        self._save_checkpoint(done, model, optimizer, lr_scheduler, ema, accelerator)
                    if cfg.sample_every and done % cfg.sample_every == 0 and accelerator.is_main_process:
                        self._sample_grid(done, unwrapped, ema)
                    if stop:
                        break
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        accelerator.wait_for_everyone()
        if done < cfg.max_steps:
            with writing(board):
                accelerator.end_training()
            raise TrainingInterrupted(done, find_checkpoints(self.run_dir)[-1])
        pipeline_dir = (
            self._save_pipeline(unwrapped, ema) if accelerator.is_main_process else self.run_dir / "pipeline"
        )
        accelerator.wait_for_everyone()
        # Every process: this closes the trackers on the main one and ends the process group.
        with writing(board):
            accelerator.end_training()
        return TrainResult(self.run_dir, done, history, pipeline_dir)

    def _stop_requested_anywhere(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self._stop_requested
        flag = torch.tensor(float(self._stop_requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _on_device(dataset, batch: dict, device) -> dict:
    """Move a batch to the device; datasets that encode features on the fly do it there."""
    if hasattr(dataset, "encode_batch"):
        return dataset.encode_batch(batch, device)
    return {k: v.to(device) for k, v in batch.items()}


def _allow_new_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed-precision setting. In a single process (a notebook training twice) nothing else
    depends on that state, so it is reset; under a distributed launch it is left alone."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        if AcceleratorState().mixed_precision != mixed_precision:
            AcceleratorState._reset_state()


def train(config: TrainConfig, dataset: FeatureDataset, **kwargs) -> TrainResult:
    """Functional entry point: ``Trainer(config, dataset, **kwargs).run()``."""
    return Trainer(config, dataset, **kwargs).run()

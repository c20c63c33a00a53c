"""``STMDiTPipeline``: expression (and optionally morphology) in, H&E tiles out.

A diffusers ``DiffusionPipeline``, so the whole thing (transformer, scheduler, GE encoder with
its gene list, morphology encoder, optional VAE) saves and loads as one folder::

    pipe = STMDiTPipeline.from_pretrained("path/to/pipeline")
    tiles = pipe(expression=adata[:8], guidance_ge=2.0, generator=torch.Generator().manual_seed(0)).images
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import BaseOutput
from PIL import Image

from stmdit import defaults
from stmdit.diffusion import Condition, sample
from stmdit.encoders.expression import PanelAlignment
from stmdit.encoders.morphology import images_to_tensor
from stmdit.encoders.vae import decode_latents, encode_images
from stmdit.io import write_text
from stmdit.model import STMDiT
from stmdit.model_card import render_model_card
from stmdit.precision import current_default
from stmdit.tiles import to_uint8


@dataclass
class STMDiTPipelineOutput(BaseOutput):
    """``images``: list of PIL images, an array (B, H, W, 3) in [0, 1], a tensor
    (B, 3, H, W), or latents, by ``output_type``; ``expression_alignment``: how the given
    expression mapped onto the encoder's gene panel (None when embeddings were given)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    expression_alignment: PanelAlignment | None = None


class STMDiTPipeline(DiffusionPipeline):
    """Tile synthesis from gene expression and morphology with dual classifier-free guidance.

    Components: ``transformer`` (:class:`~stmdit.STMDiT`), ``scheduler`` (DPM-Solver++ for latents, DDIM in pixel space),
    ``ge_encoder`` (frozen; owns the gene panel), ``morphology_encoder`` (frozen), and
    ``vae`` (``AutoencoderKL``, or None for pixel space).
    """

    model_cpu_offload_seq = "ge_encoder->morphology_encoder->transformer->vae"
    _optional_components = ["ge_encoder", "morphology_encoder", "vae"]

    def __init__(
        self,
        transformer: STMDiT,
        scheduler: DPMSolverMultistepScheduler | DDIMScheduler,
        ge_encoder=None,
        morphology_encoder=None,
        vae=None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            ge_encoder=ge_encoder,
            morphology_encoder=morphology_encoder,
            vae=vae,
        )
        # diffusers' own bar over the sampling steps; set_progress_bar_config replaces this.
        self.set_progress_bar_config(desc="sampling")

    # -- saving and sharing --------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args, card_location: str | None = None, **kwargs
    ) -> None:
        """diffusers' ``save_pretrained`` plus the model card ``README.md`` (:mod:`stmdit.model_card`):
        built from ``self.training_record`` when the trainer set one; else the card of the folder
        this pipeline was loaded from is kept (with its evaluation); else one from the components.
        ``card_location``: where the card's loading example points (default: the folder)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        target = Path(save_directory) / "README.md"
        record = getattr(self, "training_record", None)
        loaded_from = Path(self.name_or_path or "") / "README.md" if self.name_or_path else None
        if record is None and loaded_from is not None and loaded_from.is_file():
            if loaded_from.resolve() != target.resolve():
                shutil.copyfile(loaded_from, target)
        elif record is not None or not target.is_file():
            write_text(target, render_model_card(self, record, card_location or str(save_directory)))

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
    ) -> str:
        """Upload through diffusers' hub support, with this pipeline's model card. (diffusers'
        own ``push_to_hub`` replaces README.md by a generic card, so its two steps are run
        here: create the repository, then upload the saved folder.)"""
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, card_location=repo_id)
            return self._upload_folder(
                tmp, repo_id, token=token, commit_message=commit_message, create_pr=create_pr
            )

    # -- conditioning --------------------------------------------------------------------

    def encode_expression(self, expression, gene_column: str | None = None):
        """Expression (AnnData rows, DataFrame, gene-named Series or dict of counts) ->
        GE inputs and the panel alignment. Missing panel genes are reported as a warning."""
        if self.ge_encoder is None:
            raise ValueError("this pipeline has no ge_encoder; pass expression_embeds instead of expression")
        outputs, alignment = self.ge_encoder.encode(expression, gene_column=gene_column, warn_missing=False)
        if alignment.missing:
            warnings.warn(f"expression: {alignment.summary()}", stacklevel=3)
        return outputs, alignment

    def encode_morphology(self, images) -> torch.Tensor:
        """H&E tile(s) -> morphology embeddings with the pipeline's frozen encoder."""
        if self.morphology_encoder is None:
            raise ValueError(
                "this pipeline has no morphology_encoder; pass morphology_embeds instead of an image"
            )
        return self.morphology_encoder(images_to_tensor(images))

    def _condition(self, expression, morphology, expression_embeds, morphology_embeds, gene_column):
        if expression is not None and expression_embeds is not None:
            raise ValueError("give expression or expression_embeds, not both")
        if morphology is not None and morphology_embeds is not None:
            raise ValueError("give morphology or morphology_embeds, not both")
        alignment = None
        ge_inputs: dict[str, torch.Tensor] = {}
        if expression is not None:
            ge_inputs, alignment = self.encode_expression(expression, gene_column)
        elif expression_embeds is not None:
            ge_inputs = (
                expression_embeds if isinstance(expression_embeds, dict) else {"ge": expression_embeds}
            )
            unknown = set(ge_inputs) - {"ge", "ge_tokens", "ge_mask"}
            if unknown:
                raise ValueError(
                    f"expression_embeds keys must be among ge, ge_tokens, ge_mask; got {sorted(unknown)}"
                )
        if ge_inputs and not self.transformer.has_ge:
            raise ValueError(
                "this transformer was trained without gene expression (ge_injection='none'); call it without expression"
            )
        if morphology is not None:
            morph = self.encode_morphology(morphology)
        else:
            morph = morphology_embeds
        cond = Condition(morphology=morph, **ge_inputs)
        # A single morphology or expression row is shared by every spot of the batch.
        sizes = {k: v.shape[0] for k, v in cond.model_kwargs().items() if v is not None}
        if len(set(sizes.values())) > 1:
            batch = max(sizes.values())
            if any(s not in (1, batch) for s in sizes.values()):
                raise ValueError(f"expression and morphology have different numbers of spots: {sizes}")
            cond = Condition(
                **{
                    k: None if v is None else v.expand(batch, *v.shape[1:])
                    for k, v in cond.model_kwargs().items()
                }
            )
        return cond, alignment

    # -- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        expression=None,
        morphology=None,
        expression_embeds: torch.Tensor | dict[str, torch.Tensor] | None = None,
        morphology_embeds: torch.Tensor | None = None,
        guidance_morph: float = defaults.GUIDANCE_MORPH,
        guidance_ge: float = defaults.GUIDANCE_GE,
        num_inference_steps: int = defaults.STEPS,
        num_images_per_spot: int = 1,
        num_images: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        init_images=None,
        strength: float = 1.0,
        output_type: str = "pil",
        gene_column: str | None = None,
        progress: bool = True,
        guidance_ge_interval: tuple[float, float] | None = None,
        precision: str | None = None,
    ) -> STMDiTPipelineOutput:
        """Generate tiles.

        Args:
            expression: counts as AnnData rows, a DataFrame (spots x genes), a gene-named
                Series or dict; encoded with ``ge_encoder`` after reordering to its panel.
            morphology: H&E tile(s) (PIL, arrays or tensors) to encode with
                ``morphology_encoder``.
            expression_embeds / morphology_embeds: precomputed encoder outputs instead.
            guidance_morph, guidance_ge: the two classifier-free guidance scales (1 = none).
            num_images_per_spot: images drawn per condition row (different noise).
            num_images: number of unconditional images when neither modality is given.
            generator: a CPU ``torch.Generator`` for the batch, or a list with one per image
                (each image then depends only on its own generator).
            init_images, strength: edit real tiles (SDEdit): noise them to ``strength`` of the
                schedule and denoise under the given condition.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            guidance_ge_interval: GE guidance only at noise levels in (low, high] (see
                :func:`stmdit.diffusion.sample`).
            progress: show diffusers' progress bar over the steps (configured with
                ``set_progress_bar_config``); False: none.
            precision: the transformer's compute precision, ``fp32``, ``bf16`` (autocast; weights
                and scheduler stay fp32) or ``auto`` (bf16 where the device has bf16 units);
                default: :func:`stmdit.precision.current_default` (fp32 unless a command set it).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent; got {output_type!r}")
        if num_images_per_spot < 1:
            raise ValueError(f"num_images_per_spot must be >= 1; got {num_images_per_spot}")
        cond, alignment = self._condition(
            expression, morphology, expression_embeds, morphology_embeds, gene_column
        )
        batch = cond.batch_size()
        if batch is not None and num_images is not None and num_images != batch:
            raise ValueError(f"num_images ({num_images}) differs from the number of spots given ({batch})")
        if batch is None and num_images is None:
            num_images = 1
        if num_images_per_spot > 1:
            cond = cond.repeat_interleave(num_images_per_spot)
            num_images = None if num_images is None else num_images * num_images_per_spot

        latents = None
        if init_images is not None:
            tiles = images_to_tensor(init_images)
            latents = encode_images(self.vae, tiles.to(self.device))
            n = cond.batch_size() or num_images
            if latents.shape[0] == 1 and n and n > 1:
                latents = latents.expand(n, *latents.shape[1:])
            elif num_images_per_spot > 1:
                latents = latents.repeat_interleave(num_images_per_spot, dim=0)
        out = sample(
            self.transformer,
            self.scheduler,
            cond,
            num_images=num_images if cond.batch_size() is None else None,
            guidance_morph=guidance_morph,
            guidance_ge=guidance_ge,
            num_inference_steps=num_inference_steps,
            generator=generator,
            latents=latents,
            strength=strength,
            guidance_ge_interval=guidance_ge_interval,
            # diffusers' own bar, so that set_progress_bar_config(disable=True) silences it.
            progress=(lambda steps: self.progress_bar(steps)) if progress else False,
            precision=precision or current_default(),
        )
        if output_type == "latent":
            return STMDiTPipelineOutput(images=out, expression_alignment=alignment)
        images = decode_latents(self.vae, out).cpu()
        if output_type == "pt":
            return STMDiTPipelineOutput(images=images, expression_alignment=alignment)
        arr = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return STMDiTPipelineOutput(images=arr, expression_alignment=alignment)
        pil = [Image.fromarray(a) for a in to_uint8(arr)]
        return STMDiTPipelineOutput(images=pil, expression_alignment=alignment)

"""The STMDiT transformer.

A PixArt-alpha / PixCell style diffusion transformer (adaLN-single timestep conditioning,
self-attention, cross-attention to morphology tokens, MLP) with a gene-expression (GE)
pathway added in two places:

* ``adaln``: a pooled GE vector goes through an MLP and is added to the timestep embedding
  before the shared adaLN MLP, so GE modulates every block (and the final layer).
* ``xattn``: every block gets one more cross-attention layer that reads GE tokens.

GE tokens are either the projected encoder vector (``ge_pooling="cls"``, one token) or ``k``
learned seeds that attend over per-gene encoder tokens (``ge_pooling="pma"``, Pooling by
Multihead Attention from the Set Transformer).

Every GE layer that writes into the image stream starts at zero, so a model with GE
injection and untouched GE layers computes exactly what the same weights compute without
GE: warm-starting from a no-GE checkpoint (PixCell) begins where that checkpoint is.

Module names follow the original PixArt checkpoint (``x_embedder``, ``t_embedder``,
``t_block``, ``y_embedder``, ``blocks.N.attn.qkv``, ``blocks.N.cross_attn.kv_linear``,
``final_layer``) so that PixArt-format weights load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    get_2d_sincos_pos_embed,
    get_2d_sincos_pos_embed_from_grid,
    get_timestep_embedding,
)
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

GE_INJECTIONS = ("none", "adaln", "xattn", "adaln+xattn")
GE_POOLINGS = ("cls", "pma")

# Backbone sizes. B is DiT-B/2 (the paper's "-B" variants), XL is PixArt-Sigma XL/2 (PixCell-256).
PRESETS: dict[str, dict] = {
    "tiny": {"depth": 2, "hidden_size": 64, "num_heads": 4},
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear, with PixArt's ``fc1``/``fc2`` names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(*(_heads(t, self.num_heads) for t in (q, k, v)))
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Queries from ``x``, keys and values from ``context``; ``mask`` (B, L) is True where a
    context token is real and False where it is padding."""

    def __init__(self, dim: int, num_heads: int, zero_init_output: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.zero_init_output = zero_init_output

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = _heads(self.q_linear(x), self.num_heads)
        k, v = (_heads(t, self.num_heads) for t in self.kv_linear(context).chunk(2, dim=-1))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(_merge_heads(out))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """256-d sinusoidal timestep features (cos first, as PixArt) through an MLP."""

    frequency_dim = 256

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = get_timestep_embedding(t, self.frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def token_grid_pos_embed(
    dim: int, num_tokens: int, base_size: int, interpolation_scale: float
) -> torch.Tensor:
    """PixCell-1024's sin-cos table for a square grid of morphology tokens: the grid is
    stretched to the image's patch grid (``base_size``), scaled by ``interpolation_scale``
    and shifted by ``base_size // num_tokens`` (PixCell's phase)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"morph_tokens must be a square number (a grid of tiles); got {num_tokens}")
    coords = torch.arange(side, dtype=torch.float32) / (side / base_size) / interpolation_scale
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy")).reshape(2, 1, side, side)
    return get_2d_sincos_pos_embed_from_grid(dim, grid + base_size // num_tokens, output_type="pt").float()


class MorphologyEmbedder(nn.Module):
    """Morphology embedding(s) (e.g. UNI-2h, 1536-d) -> hidden-size cross-attention tokens.

    The null condition is PixArt's fixed random buffer ``randn(tokens, dim) / sqrt(dim)``.
    With several tokens (a grid of tile embeddings, as PixCell-1024) PixCell's sin-cos grid
    table is added to the embeddings before the projection, and a dropped row's null replaces
    the embeddings with the table: PixCell's training code (``PixArt.forward``, then
    ``CaptionEmbedder.token_drop``) drops after adding it, so that is the null its weights
    learned, while its diffusers inference adds the table to the null it is given as well.
    """

    def __init__(
        self, morph_dim: int, num_tokens: int, hidden_size: int, base_size: int, interpolation_scale: float
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.y_proj = Mlp(morph_dim, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(num_tokens, morph_dim) / morph_dim**0.5)
        if num_tokens > 1:
            pos = token_grid_pos_embed(morph_dim, num_tokens, base_size, interpolation_scale)
            self.register_buffer("pos_embed", pos[None], persistent=False)
        else:
            self.pos_embed = None

    def forward(self, morphology: torch.Tensor | None, drop: torch.Tensor | None, batch: int) -> torch.Tensor:
        dtype = self.y_proj.fc1.weight.dtype
        null = self.y_embedding[None].expand(batch, -1, -1).to(dtype)
        if morphology is None:
            return self.y_proj(null)
        y = morphology.to(dtype)
        if self.pos_embed is not None:
            y = y + self.pos_embed.to(dtype)
        if drop is not None:
            y = torch.where(drop[:, None, None], null, y)
        return self.y_proj(y)


class PoolingByMultiheadAttention(nn.Module):
    """Set Transformer PMA: ``k`` learned seeds attend over a padded set of tokens.

    MAB(S, Z) = LN(H + FF(H)), H = LN(S + Attention(S, Z, Z)).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_seeds: int):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(num_seeds, hidden_size) * 0.02)
        self.attn = CrossAttention(hidden_size, num_heads, zero_init_output=False)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.ff = Mlp(hidden_size, 4 * hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        seeds = self.seeds[None].expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        h = self.norm1(seeds + self.attn(seeds, tokens, mask))
        return self.norm2(h + self.ff(h))


class ExpressionEmbedder(nn.Module):
    """GE condition -> (tokens (B, n, hidden), pooled vector (B, hidden)).

    The GE null is a learned set of tokens in hidden space; it replaces the pooled tokens of
    dropped rows (and of every row when no GE is given), and its mean is the pooled null.
    """

    def __init__(
        self, pooling: str, ge_dim: int, ge_token_dim: int, pma_seeds: int, hidden_size: int, num_heads: int
    ):
        super().__init__()
        self.pooling = pooling
        if pooling == "cls":
            self.proj = Mlp(ge_dim, hidden_size, hidden_size)
            num_tokens = 1
        else:
            self.token_proj = nn.Linear(ge_token_dim, hidden_size)
            self.pma = PoolingByMultiheadAttention(hidden_size, num_heads, pma_seeds)
            num_tokens = pma_seeds
        self.null_tokens = nn.Parameter(torch.randn(num_tokens, hidden_size) * 0.02)

    def forward(
        self,
        batch: int,
        ge: torch.Tensor | None,
        ge_tokens: torch.Tensor | None,
        ge_mask: torch.Tensor | None,
        drop: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        null = self.null_tokens[None].expand(batch, -1, -1)
        if self.pooling == "cls":
            tokens = None if ge is None else self.proj(ge.to(self.proj.fc1.weight.dtype))[:, None]
        else:
            tokens = (
                None
                if ge_tokens is None
                else self.pma(self.token_proj(ge_tokens.to(self.token_proj.weight.dtype)), ge_mask)
            )
        if tokens is None:
            tokens = null
        elif drop is not None:
            tokens = torch.where(drop[:, None, None], null.to(tokens.dtype), tokens)
        return tokens, tokens.mean(dim=1)


class STMDiTBlock(nn.Module):
    """PixArt block, plus an optional zero-initialised GE cross-attention after the
    morphology cross-attention (no norm or modulation before either, as in PixArt)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, ge_xattn: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.ge_cross_attn = CrossAttention(hidden_size, num_heads) if ge_xattn else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: torch.Tensor, t6: torch.Tensor, morph_tokens: torch.Tensor, ge_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, morph_tokens)
        if self.ge_cross_attn is not None:
            x = x + self.ge_cross_attn(x, ge_tokens)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, eps: float):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class STMDiT(ModelMixin, ConfigMixin):
    """Diffusion transformer for H&E tiles conditioned on morphology and gene expression.

    Inputs of :meth:`forward`:

    * ``x``: noisy latents (B, in_channels, sample_size, sample_size).
    * ``timestep``: (B,) or scalar diffusion step in [0, 1000).
    * ``morphology``: (B, morph_dim) or (B, morph_tokens, morph_dim) embeddings, or None (null).
    * ``ge``: (B, ge_dim) encoder vector, for ``ge_pooling="cls"``.
    * ``ge_tokens``, ``ge_mask``: (B, L, ge_token_dim) per-gene encoder outputs and a bool
      (B, L) mask, True for real genes and False for padding, for ``ge_pooling="pma"``.
    * ``drop_morphology``, ``drop_ge``: bool (B,); True rows use the modality's null.

    Returns the prediction (B, out_channels, sample_size, sample_size): epsilon, followed
    by the variance interpolation channels when ``out_channels == 2 * in_channels``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        morph_dim: int = 1536,
        morph_tokens: int = 1,
        ge_injection: str = "adaln+xattn",
        ge_pooling: str = "cls",
        ge_dim: int = 256,
        ge_token_dim: int = 256,
        pma_seeds: int = 8,
        interpolation_scale: float = 1.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if ge_injection not in GE_INJECTIONS:
            raise ValueError(f"ge_injection must be one of {GE_INJECTIONS}, got {ge_injection!r}")
        if ge_pooling not in GE_POOLINGS:
            raise ValueError(f"ge_pooling must be one of {GE_POOLINGS}, got {ge_pooling!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size})")
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(
                f"out_channels must be in_channels ({in_channels}) or, with learned variance, "
                f"2 * in_channels ({2 * in_channels}); got {out_channels}"
            )
        self.out_channels = out_channels
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        grid = sample_size // patch_size
        pos = get_2d_sincos_pos_embed(
            hidden_size, grid, base_size=grid, interpolation_scale=interpolation_scale, output_type="pt"
        )
        self.register_buffer("pos_embed", pos.float()[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = MorphologyEmbedder(morph_dim, morph_tokens, hidden_size, grid, interpolation_scale)

        self.ge_embedder = None
        self.ge_adaln = None
        if ge_injection != "none":
            self.ge_embedder = ExpressionEmbedder(
                ge_pooling, ge_dim, ge_token_dim, pma_seeds, hidden_size, num_heads
            )
        if "adaln" in ge_injection:
            self.ge_adaln = nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )

        self.blocks = nn.ModuleList(
            STMDiTBlock(hidden_size, num_heads, mlp_ratio, "xattn" in ge_injection, norm_eps)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, norm_eps)
        self._initialize_weights()

    # -- set-up -------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> STMDiT:
        """Build a model from a size preset (``tiny``, ``S``, ``B``, ``L``, ``XL``); any
        constructor argument can be overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def _initialize_weights(self) -> None:
        # PixArt initialisation: xavier linears, small-normal embedders, zero outputs.
        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in (self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, CrossAttention) and module.zero_init_output:
                nn.init.zeros_(module.proj.weight)
                nn.init.zeros_(module.proj.bias)
        if self.ge_adaln is not None:
            nn.init.zeros_(self.ge_adaln[-1].weight)
            nn.init.zeros_(self.ge_adaln[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def has_ge(self) -> bool:
        return self.config.ge_injection != "none"

    @property
    def learns_variance(self) -> bool:
        return self.out_channels == 2 * self.config.in_channels

    # -- forward ------------------------------------------------------------------------

    def check_inputs(
        self,
        x,
        timestep,
        morphology=None,
        ge=None,
        ge_tokens=None,
        ge_mask=None,
        drop_morphology=None,
        drop_ge=None,
    ) -> None:
        """Raise ValueError, naming the expected shape, for inputs :meth:`forward` cannot take."""
        timestep = torch.as_tensor(timestep)
        cfg = self.config
        expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (batch, {', '.join(map(str, expected))}); got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, b)):
            raise ValueError(f"timestep must be a scalar or have shape ({b},); got {tuple(timestep.shape)}")
        if morphology is not None:
            ok_shapes = {(b, cfg.morph_tokens, cfg.morph_dim)} | (
                {(b, cfg.morph_dim)} if cfg.morph_tokens == 1 else set()
            )
            if tuple(morphology.shape) not in ok_shapes:
                raise ValueError(
                    f"morphology must have shape {' or '.join(str(s) for s in sorted(ok_shapes))} "
                    f"(batch, morph_tokens, morph_dim); got {tuple(morphology.shape)}"
                )
        given_ge = ge is not None or ge_tokens is not None
        if given_ge and not self.has_ge:
            raise ValueError("this STMDiT has ge_injection='none' and takes no gene expression; pass ge=None")
        # An encoder may supply both the vector and the tokens; the model reads the one its
        # pooling needs and requires that one.
        if given_ge and cfg.ge_pooling == "cls" and ge is None:
            raise ValueError("ge_pooling='cls' reads the encoder vector: pass ge (batch, ge_dim)")
        if given_ge and cfg.ge_pooling == "pma" and ge_tokens is None:
            raise ValueError("ge_pooling='pma' reads per-gene tokens: pass ge_tokens (and ge_mask)")
        if ge is not None and cfg.ge_pooling == "cls" and tuple(ge.shape) != (b, cfg.ge_dim):
            raise ValueError(f"ge must have shape ({b}, ge_dim={cfg.ge_dim}); got {tuple(ge.shape)}")
        if ge_tokens is not None and cfg.ge_pooling == "pma":
            if ge_tokens.ndim != 3 or ge_tokens.shape[0] != b or ge_tokens.shape[2] != cfg.ge_token_dim:
                raise ValueError(
                    f"ge_tokens must have shape ({b}, n_genes, ge_token_dim={cfg.ge_token_dim}); got {tuple(ge_tokens.shape)}"
                )
            if ge_mask is not None:
                if tuple(ge_mask.shape) != tuple(ge_tokens.shape[:2]) or ge_mask.dtype != torch.bool:
                    raise ValueError(
                        f"ge_mask must be a bool tensor of shape {tuple(ge_tokens.shape[:2])}; "
                        f"got {ge_mask.dtype} {tuple(ge_mask.shape)}"
                    )
                empty = (~ge_mask.any(dim=1)).nonzero().flatten()
                if len(empty):
                    raise ValueError(
                        f"ge_mask rows {empty.tolist()} have no valid token; every spot needs at least one"
                    )
        for name, drop in (("drop_morphology", drop_morphology), ("drop_ge", drop_ge)):
            if drop is not None and (drop.dtype != torch.bool or tuple(drop.shape) != (b,)):
                raise ValueError(
                    f"{name} must be a bool tensor of shape ({b},); got {drop.dtype} {tuple(drop.shape)}"
                )

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | int | float,
        morphology: torch.Tensor | None = None,
        ge: torch.Tensor | None = None,
        ge_tokens: torch.Tensor | None = None,
        ge_mask: torch.Tensor | None = None,
        drop_morphology: torch.Tensor | None = None,
        drop_ge: torch.Tensor | None = None,
    ) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=x.device)
        self.check_inputs(x, timestep, morphology, ge, ge_tokens, ge_mask, drop_morphology, drop_ge)
        b, _, h, w = x.shape
        p = self.config.patch_size
        if morphology is not None and morphology.ndim == 2:
            morphology = morphology[:, None]

        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        t = self.t_embedder(timestep.expand(b))
        ge_ctx = None
        if self.ge_embedder is not None:
            ge_ctx, ge_pooled = self.ge_embedder(b, ge, ge_tokens, ge_mask, drop_ge)
            if self.ge_adaln is not None:
                t = t + self.ge_adaln(ge_pooled)
            if "xattn" not in self.config.ge_injection:
                ge_ctx = None
        t6 = self.t_block(t)
        morph_ctx = self.y_embedder(morphology, drop_morphology, b)

        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, t6, morph_ctx, ge_ctx, use_reentrant=False)
            else:
                tokens = block(tokens, t6, morph_ctx, ge_ctx)
        out = self.final_layer(tokens, t)
        # (B, (h/p)*(w/p), p*p*C) -> (B, C, h, w)
        out = out.view(b, h // p, w // p, p, p, self.out_channels)
        return torch.einsum("bhwpqc->bchpwq", out).reshape(b, self.out_channels, h, w)

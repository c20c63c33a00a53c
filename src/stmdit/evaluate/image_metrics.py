"""Image-distribution metrics for generated tiles: FID, KID and FD-UNI, each with its protocol.

The paper's FIDs (252.9 in distribution, 690.0 out of distribution) sit far above the 13-25 that
peers report on TCGA tiles. Such numbers are only interpretable with their protocol: how many
real and generated images, at which size, resized how, through which feature extractor with
which weights, against which reference set. :func:`compute_image_metrics` therefore attaches a
``protocol`` to every number and a ``warnings`` list that says when a number should not be
trusted (for instance an FID from fewer images than feature dimensions).

- FID: Fréchet distance between Gaussians fitted to the 2048-d pool features of the FID
  Inception-v3 (TensorFlow's inception-2015-12-05 graph as ported by torch-fidelity), loaded
  from a local weights file, never downloaded silently at evaluation time.
- KID: the unbiased squared MMD with the cubic polynomial kernel over random subsets
  (Binkowski et al. 2018), with torch-fidelity's defaults and subset sampling.
- FD-UNI (or FD-<name>): the same Fréchet distance in a pathology encoder's feature space
  (UNI-2h when available), which sees tissue morphology rather than ImageNet objects.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from stmdit.encoders.morphology import images_to_tensor
from stmdit.hub import WeightsUnavailableError, offline

INCEPTION_WEIGHTS_ENV = "STMDIT_INCEPTION_WEIGHTS"
# torch-fidelity's port of TensorFlow's inception-2015-12-05 FID graph, and pytorch-fid's file of the
# same origin. The "-6726825d" suffix is, by torch.hub's naming convention, the start of the file's
# sha256; a file whose hash starts otherwise is reported as non-standard.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_WEIGHTS_FILE
)
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_PREPROCESSING = (
    "images in [0, 1] -> uint8 as round(255 x) -> bilinear resize to 299 x 299 as TensorFlow 1.x does it "
    "(torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x, align_corners=False, no antialiasing) -> "
    "(x - 128) / 128"
)
# The sample sizes under which a Fréchet distance is known to be strongly biased (it falls with N).
_STANDARD_FID_IMAGES = 10_000


# ---------------------------------------------------------------------------------------------
# Fréchet distance and KID on features
# ---------------------------------------------------------------------------------------------


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof = 1) of (n, d) features, in float64, as FID defines them."""
    x = _as_features(features)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors; got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, imag_tol: float = 1e-3) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    The square root uses ``scipy.linalg.sqrtm`` as the reference FID code does. When the product
    is singular enough for the root to come out non-finite, ``eps`` is added to both diagonals and
    the root retried. Rounding makes the root slightly complex; imaginary parts on its diagonal up
    to ``imag_tol`` are discarded, larger ones mean the statistics are broken and raise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"means must be (d,) and covariances (d, d) of one d; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected (few images) and handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(d)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        worst = float(np.abs(np.diagonal(covmean).imag).max())
        if worst > imag_tol:
            raise ValueError(
                f"the matrix square root has imaginary components up to {worst:.3g} on its diagonal "
                f"(tolerance {imag_tol}): the covariances are not valid (non-finite features, or far too "
                "few samples)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    With fewer samples than dimensions (n_a + n_b - 2 < d) both covariances live in the span of
    the centred features, so the trace terms are computed exactly in an orthonormal basis of that
    span (dimension <= n_a + n_b) instead of through a d x d square root that is both singular and
    slow (a 2048 x 2048 root takes tens of seconds on two cores). Otherwise this is
    ``frechet_distance(*gaussian_stats(a), *gaussian_stats(b))``.
    """
    a, b = _as_features(features_a), _as_features(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples per set; got {len(a)} and {len(b)}")
    if len(a) + len(b) - 2 >= a.shape[1]:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca, cb = a - mu_a, b - mu_b
    basis, _ = np.linalg.qr(np.concatenate([ca, cb]).T)
    pa, pb = ca @ basis, cb @ basis
    zero = np.zeros(basis.shape[1])
    diff = mu_a - mu_b
    with warnings.catch_warnings():
        # Singular by construction (rank n - 1 per set); callers report the rank deficiency themselves.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        traces = frechet_distance(zero, pa.T @ pa / (len(a) - 1), zero, pb.T @ pb / (len(b) - 1))
    return float(diff @ diff) + traces


def kid(
    features_a,
    features_b,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and (population) std over ``subsets`` of the unbiased MMD^2
    with kernel ``k(x, y) = (gamma x.y + coef0)^degree`` (gamma = 1/d by default) between random
    subsets of ``subset_size`` from each set, drawn without replacement: torch-fidelity's
    ``kid_features_to_metric`` to the letter (its draws, ``numpy.random.RandomState(seed).choice``
    for set a then set b, and its order of summation), so the same features and seed give its
    mean and std, even the rounding-only std of subsets that are the whole set (in float64 here;
    torch-fidelity keeps Inception's float32). It can be slightly negative when the sets match.
    """
    a, b = _as_features(features_a), _as_features(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = int(subset_size)
    if m < 2 or m > min(len(a), len(b)):
        raise ValueError(f"subset_size must be in [2, min(n_a, n_b)] = [2, {min(len(a), len(b))}]; got {m}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1; got {subsets}")
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (np.matmul(x, x.T) * g + coef0) ** degree
        k_yy = (np.matmul(y, y.T) * g + coef0) ** degree
        k_xy = (np.matmul(x, y.T) * g + coef0) ** degree
        within_x = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
        within_y = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
        mmds[i] = (within_x + within_y) / (m * (m - 1)) - 2 * k_xy.sum(axis=0).sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


def _as_features(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d); got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x


# ---------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _inception_advice(reason: str) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        "FID and KID need the FID Inception-v3 weights (TensorFlow's inception-2015-12-05 graph ported to "
        f"PyTorch): the file {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} (pytorch-fid's "
        f"{PYTORCH_FID_WEIGHTS_FILE} from {PYTORCH_FID_WEIGHTS_URL} has the same origin and hash suffix); "
        f"its sha256 should start with {INCEPTION_SHA256_PREFIX}. {reason} Download it on a machine with "
        f"internet access, then either set {INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILE}, pass "
        f"InceptionFeatures(weights=PATH), or put it in {cache}."
    )


def resolve_inception_weights(weights: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The local Inception weights file: ``weights``, else ``$STMDIT_INCEPTION_WEIGHTS``, else the
    torch hub cache (torch-fidelity's or pytorch-fid's file name), else a download into that cache
    (skipped when ``download`` is false or ``HF_HUB_OFFLINE`` is set). Failing all of these, the
    error names the file, where to get it and how to point STMDiT at it."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_inception_advice(f"The weights file given, {path}, does not exist."))
        return path
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        path = Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                _inception_advice(f"{INCEPTION_WEIGHTS_ENV} names {path}, which does not exist.")
            )
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (INCEPTION_WEIGHTS_FILE, PYTORCH_FID_WEIGHTS_FILE):
        if (cache / name).is_file():
            return cache / name
    if not download or offline():
        why = "downloads are disabled" if not download else "HF_HUB_OFFLINE is set"
        raise WeightsUnavailableError(_inception_advice(f"It is not in {cache} and {why}."))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / INCEPTION_WEIGHTS_FILE
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(target), progress=False)
    except Exception as err:  # no network, proxy, HTTP error: every failure gets the same advice
        raise WeightsUnavailableError(
            _inception_advice(f"It is not in {cache} and downloading it failed ({err}).")
        ) from err
    return target


class InceptionFeatures(torch.nn.Module):
    """The FID Inception-v3: images (B, 3, H, W) in [0, 1] -> (B, 2048) pool features.

    Built from torch-fidelity's ``FeatureExtractorInceptionV3`` (the TensorFlow-exact port used
    for published FIDs) with weights from a local file (see :func:`resolve_inception_weights`).
    The file is first read with ``weights_only=True``, so a file that would run code when
    unpickled is refused before torch-fidelity reads it. Preprocessing (``INCEPTION_PREPROCESSING``)
    quantises to uint8 first, so float tiles score as the PNGs a user would save from them.
    """

    output_dim = 2048

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 50,
        download: bool = True,
        progress: bool = True,
    ):
        super().__init__()
        try:
            import torch_fidelity
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ImportError(
                "InceptionFeatures needs torch-fidelity: pip install 'torch-fidelity>=0.3,<0.5'"
            ) from err
        from stmdit.io import load_state_dict_file

        path = resolve_inception_weights(weights, download=download)
        state = load_state_dict_file(path)
        if not isinstance(state, Mapping):
            raise ValueError(
                f"{path} does not hold a state dict (got {type(state).__name__}); see {INCEPTION_WEIGHTS_URL}"
            )
        try:
            self.model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped tensors
            detail = str(err) if len(str(err)) < 400 else str(err)[:400] + " ..."
            raise ValueError(f"{path} is not a state dict of the FID Inception-v3: {detail}") from err
        self.batch_size = batch_size
        self.progress = progress
        self.weights_path = path.resolve()
        self.weights_sha256 = _sha256(path)
        self.protocol = {
            "extractor": "Inception-v3 FID network (torch-fidelity FeatureExtractorInceptionV3), "
            "2048-d pool3 features",
            "torch_fidelity_version": torch_fidelity.__version__,
            "weights_file": str(self.weights_path),
            "weights_sha256": self.weights_sha256,
            "weights_standard": self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX),
            "preprocessing": INCEPTION_PREPROCESSING,
            "internal_dtype": "float32",
            "output_dim": self.output_dim,
        }
        if device is not None:
            self.to(device)

    def train(self, mode: bool = True):  # frozen: batch norm keeps its running statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        """Images (see :func:`stmdit.encoders.morphology.images_to_tensor`) -> (B, 2048) float32."""
        x = images_to_tensor(images)
        device = next(self.model.parameters()).device
        out = []
        chunks = x.split(self.batch_size)
        for chunk in tqdm(
            chunks, desc="Inception features", unit="batch", disable=not self.progress, leave=False
        ):
            as_uint8 = (chunk * 255).round().clamp(0, 255).to(torch.uint8)
            out.append(self.model(as_uint8.to(device))[0])
        return torch.cat(out)


class MorphologyFeatures:
    """A frozen morphology encoder as a feature extractor for Fréchet distances (FD-UNI).

    Wraps any encoder with the STMDiT interface (images (B, 3, H, W) in [0, 1] -> (B, D)) and
    records what a reader needs to reproduce its number: the encoder's name, configuration and
    weights file with its sha256. Without a weights file (a weight-free or fitted encoder such as
    ``StainFeatureEncoder``), a torch module is identified by the sha256 of its state dict.
    """

    def __init__(self, encoder: Callable, name: str, weights: str | os.PathLike | None = None):
        self.encoder = encoder
        self.name = name
        config = getattr(encoder, "config", None)
        self.protocol = {
            "extractor": name,
            "encoder_class": type(encoder).__name__,
            "encoder_config": {k: v for k, v in dict(config).items() if not k.startswith("_")}
            if config
            else None,
            "output_dim": getattr(encoder, "output_dim", None),
            "preprocessing": _encoder_preprocessing(config),
            "weights_file": None,
            "weights_sha256": None,
        }
        if weights is not None:
            path = Path(weights).expanduser()
            if path.is_file():
                self.protocol.update(weights_file=str(path.resolve()), weights_sha256=_sha256(path))
            else:
                self.protocol["weights_file"] = str(weights)
        if self.protocol["weights_sha256"] is None and isinstance(encoder, torch.nn.Module):
            self.protocol["state_dict_sha256"] = _state_dict_sha256(encoder)

    def __call__(self, images) -> torch.Tensor:
        out = self.encoder(images)
        if out.ndim != 2:
            raise ValueError(
                f"{self.name} returned features of shape {tuple(out.shape)}; Fréchet distances need "
                "(B, D): use an encoder with grid=1"
            )
        return out


def _state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over the names and raw bytes of a module's parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _encoder_preprocessing(config) -> str:
    if config is None or "image_size" not in config:
        return "as the encoder does (not recorded)"
    text = f"bilinear antialiased resize to {config['image_size']} x {config['image_size']}"
    if "mean" in config and "std" in config:
        text += f", normalised with mean {tuple(config['mean'])} and std {tuple(config['std'])}"
    if config.get("half_precision"):
        text += ", float16 autocast on GPU"
    return text


def uni2h_features(
    source: str | os.PathLike | None = None, device: str | torch.device | None = None, **overrides
) -> MorphologyFeatures:
    """UNI-2h as FD-UNI's extractor, from ``source`` (a local file or folder, or a hub id), else
    ``$STMDIT_UNI2H``, else the gated hub repository MahmoodLab/UNI2-h (errors say how to get it).
    ``overrides`` change the timm constructor, as in ``TimmMorphologyEncoder.uni2h``."""
    from stmdit.encoders.morphology import TimmMorphologyEncoder, _backbone_file

    source = source or os.environ.get("STMDIT_UNI2H") or "MahmoodLab/UNI2-h"
    path = _backbone_file(source, ("model.safetensors", "pytorch_model.bin"))
    encoder = TimmMorphologyEncoder.uni2h(path, **overrides)
    if device is not None:
        encoder.to(device)
    return MorphologyFeatures(encoder, "UNI-2h", weights=path)


def extract_features(
    extractor: Callable, images, batch_size: int = 64
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Features (n, D) in float64 of ``images`` (a tensor, an array or a list of images, sliced in
    batches) and the distinct image sizes (H, W) seen."""
    sizes: set[tuple[int, int]] = set()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images_to_tensor(images[start : start + batch_size])
            sizes.add((int(batch.shape[-2]), int(batch.shape[-1])))
            out.append(_as_features(extractor(batch)))
    if not out:
        raise ValueError("no images given")
    return np.concatenate(out), sorted(sizes)


# ---------------------------------------------------------------------------------------------
# All metrics with their protocol
# ---------------------------------------------------------------------------------------------


def _describe(name: str, extractor: Callable) -> tuple[dict, list[str]]:
    protocol = getattr(extractor, "protocol", None)
    notes = []
    if not isinstance(protocol, dict):
        protocol = {
            "extractor": f"{name} ({type(extractor).__name__})",
            "weights_file": None,
            "weights_sha256": None,
        }
    if not (protocol.get("weights_sha256") or protocol.get("state_dict_sha256")):
        notes.append(
            f"the {name} extractor does not record its weights (file hash or state-dict hash); the number "
            "cannot be reproduced from this record (wrap the encoder in MorphologyFeatures(encoder, name, "
            "weights=PATH))"
        )
    if protocol.get("weights_standard") is False:
        notes.append(
            f"the Inception weights {protocol.get('weights_file')} are not the standard FID file (sha256 "
            f"{protocol.get('weights_sha256', '')[:12]}... does not start with {INCEPTION_SHA256_PREFIX}): "
            "FID and KID are not comparable with published values"
        )
    return protocol, notes


def _fd_entry(metric: str, fa: np.ndarray, fb: np.ndarray, protocol: dict) -> dict:
    n_real, n_fake, dim = len(fa), len(fb), fa.shape[1]
    notes = []
    if min(n_real, n_fake) < 2:
        return _with_caveats(
            {"value": None, "protocol": protocol},
            [("too_few_images", f"{metric} needs at least 2 real and 2 generated images")],
        )
    if min(n_real, n_fake) <= dim:
        notes.append(
            (
                "rank_deficient",
                f"{metric} from {n_real} real and {n_fake} generated images in a {dim}-d feature space: the "
                f"covariance estimates have rank at most {min(n_real, n_fake) - 1} < {dim}, so the distance is "
                "rank-deficient, biased upwards and unstable (it falls as images are added); compare it only "
                f"with values from the same image counts, and use more than {dim} images per set for a "
                "reportable value (FID convention: 10,000-50,000)",
            )
        )
    elif min(n_real, n_fake) < _STANDARD_FID_IMAGES:
        notes.append(
            (
                "few_images",
                f"{metric} from {n_real} real and {n_fake} generated images: Fréchet distances are biased "
                f"upwards below about {_STANDARD_FID_IMAGES:,} images per set; compare only values from equal "
                "image counts",
            )
        )
    value = frechet_distance_from_features(fa, fb)
    method = (
        "scipy.linalg.sqrtm of the d x d covariance product"
        if n_real + n_fake - 2 >= dim
        else "trace term computed exactly in the span of the centred features (fewer samples than dimensions)"
    )
    return _with_caveats({"value": value, "protocol": {**protocol, "computation": method}}, notes)


def _with_caveats(entry: dict, notes) -> dict:
    """``entry`` with its ``warnings`` (texts) and ``caveats`` (each text with its kind, so that a
    report can give one line per kind of caveat however many scopes share it)."""
    return {
        **entry,
        "warnings": [text for _, text in notes],
        "caveats": [{"kind": kind, "text": text} for kind, text in notes],
    }


def _kid_entry(
    fa: np.ndarray, fb: np.ndarray, subsets: int, subset_size: int, seed: int, protocol: dict
) -> dict:
    m = min(subset_size, len(fa), len(fb))  # torch-fidelity refuses fewer images than subset_size
    kid_protocol = {
        **protocol,
        "kid_kernel": "(x.y / d + 1)^3",
        "kid_estimator": "unbiased MMD^2, torch-fidelity's subset sampling and summation",
        "kid_subsets": subsets,
        "kid_subset_size": m,
        "kid_subset_size_requested": subset_size,
        "kid_seed": seed,
        "kid_std": "population std (ddof = 0) over subsets",
    }
    if m < 2:
        return _with_caveats(
            {"mean": None, "std": None, "protocol": kid_protocol},
            [("too_few_images", "KID needs at least 2 images per set")],
        )
    whole = "both sets, so its std is rounding only" if len(fa) == len(fb) == m else "the smaller set"
    few = (
        f"KID from few images: subsets of {m} images instead of {subset_size} (torch-fidelity refuses this), "
        f"each the whole of {whole}; the mean is still unbiased but noisier, and the std is not comparable "
        "with values from other subset sizes"
    )
    notes = [("small_kid_subsets", few)] if m < subset_size else []
    mean, std = kid(fa, fb, subsets=subsets, subset_size=m, seed=seed)
    return _with_caveats({"mean": mean, "std": std, "protocol": kid_protocol}, notes)


def _groups(per_group, n_real: int, n_fake: int) -> tuple[np.ndarray, np.ndarray] | None:
    if per_group is None:
        return None
    if isinstance(per_group, tuple) and len(per_group) == 2:
        real_labels, fake_labels = ([str(label) for label in g] for g in per_group)
    else:
        if n_real != n_fake:
            raise ValueError(
                f"one label list fits only paired sets; got {n_real} real and {n_fake} generated images: "
                "pass per_group=(real_labels, generated_labels)"
            )
        real_labels = fake_labels = [str(label) for label in per_group]
    if len(real_labels) != n_real or len(fake_labels) != n_fake:
        raise ValueError(
            f"group labels must match the images: {len(real_labels)}/{n_real} real, "
            f"{len(fake_labels)}/{n_fake} generated"
        )
    return np.asarray(real_labels, dtype=object), np.asarray(fake_labels, dtype=object)


def compute_image_metrics(
    real_images,
    fake_images,
    extractors: Mapping[str, Callable],
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    per_group: Sequence | tuple[Sequence, Sequence] | None = None,
    reference: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    real_cache: dict | None = None,
) -> dict:
    """FID, KID and FD-<name> between real and generated tiles, overall and per group.

    ``real_cache``: a dict kept by the caller for one real set; its features are extracted once
    and reused when several generated sets are compared with the same real tiles.

    ``extractors``: ``"inception"`` (an :class:`InceptionFeatures`) gives FID and KID; every other
    entry, e.g. ``"uni"`` (:func:`uni2h_features`), gives ``fd_<name>``. Images: tensors
    (N, 3, H, W) in [0, 1] or uint8, arrays (N, H, W, 3) or lists of PIL images.
    ``per_group``: one label per image when the sets are paired (e.g. the sample id of the spot a
    tile was generated for), or ``(real_labels, generated_labels)``. ``reference``: what the real
    set is (dataset, split, tiling), recorded with every number.

    Returns ``{"overall": {metric: entry}, "per_group": {label: {metric: entry}} or None,
    "warnings": [...], "protocol": {...}}``; every entry holds its value(s), a ``protocol`` (image
    counts and sizes, feature extractor, weights file and hash, preprocessing, reference set) and
    its own ``warnings`` (including those about its extractor); the top-level list gathers them,
    extractor warnings once and the others with their scope. ``caveats`` holds the same notes as
    records (``metric``, ``kind``, ``group``: None for overall, ``text``) for reports that give
    one line per kind of caveat.
    """
    n_real, n_fake = len(real_images), len(fake_images)
    groups = _groups(per_group, n_real, n_fake)
    features, described, sizes = {}, {}, {"real": set(), "generated": set()}
    for name, extractor in extractors.items():
        if real_cache is not None and name in real_cache:
            fr, real_sizes = real_cache[name]
        else:
            fr, real_sizes = extract_features(extractor, real_images, batch_size)
            if real_cache is not None:
                real_cache[name] = (fr, real_sizes)
        ff, fake_sizes = extract_features(extractor, fake_images, batch_size)
        features[name] = (fr, ff)
        described[name] = _describe(name, extractor)
        sizes["real"].update(real_sizes)
        sizes["generated"].update(fake_sizes)
    common = {
        "reference": reference or "not described",
        "real_image_sizes": [list(s) for s in sorted(sizes["real"])],
        "generated_image_sizes": [list(s) for s in sorted(sizes["generated"])],
    }
    top_warnings = (
        []
        if reference
        else ["no reference-set description given (reference=...): record what the real images are"]
    )
    caveats = [{"metric": None, "kind": "no_reference", "group": None, "text": w} for w in top_warnings]
    top_warnings += [w for _, extractor_warnings in described.values() for w in extractor_warnings]
    caveats += [
        {"metric": name, "kind": "extractor", "group": None, "text": w}
        for name, (_, extractor_warnings) in described.items()
        for w in extractor_warnings
    ]

    def scope_metrics(group: str | None, real_idx: np.ndarray, fake_idx: np.ndarray) -> dict:
        scope = "overall" if group is None else f"group {group!r}"
        entries = {}
        for name, (fr, ff) in features.items():
            extractor_protocol, extractor_warnings = described[name]
            protocol = {
                **common,
                "n_real": len(real_idx),
                "n_generated": len(fake_idx),
                "feature_extractor": extractor_protocol,
            }
            fa, fb = fr[real_idx], ff[fake_idx]
            if name == "inception":
                named = {
                    "fid": _fd_entry("FID", fa, fb, protocol),
                    "kid": _kid_entry(fa, fb, kid_subsets, kid_subset_size, seed, protocol),
                }
            else:
                named = {f"fd_{name}": _fd_entry(f"FD-{name.upper()}", fa, fb, protocol)}
            for metric, entry in named.items():
                top_warnings.extend(f"{scope} {metric}: {w}" for w in entry["warnings"])
                caveats.extend({"metric": metric, "group": group, **c} for c in entry.pop("caveats"))
                entry["warnings"] = extractor_warnings + entry["warnings"]
            entries.update(named)
        return entries

    overall = scope_metrics(None, np.arange(n_real), np.arange(n_fake))
    per_group_results = None
    if groups is not None:
        real_labels, fake_labels = groups
        per_group_results = {
            label: scope_metrics(
                label, np.flatnonzero(real_labels == label), np.flatnonzero(fake_labels == label)
            )
            for label in sorted(set(real_labels) | set(fake_labels))
        }
    return {
        "overall": overall,
        "per_group": per_group_results,
        "warnings": top_warnings,
        "caveats": caveats,
        "protocol": {
            **common,
            "n_real": n_real,
            "n_generated": n_fake,
            "extractors": {k: v[0] for k, v in described.items()},
        },
    }

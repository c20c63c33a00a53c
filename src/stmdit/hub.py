"""Where the real weights come from, and fetching them with errors that say what to do.

Every loader in STMDiT takes either a local path or a Hugging Face hub id. Hub access goes
through :func:`hub_file` / :func:`hub_snapshot`, which respect ``HF_HUB_OFFLINE`` (read at call
time) and turn the hub's errors (gated repository, no network, not cached) into messages that
name the model, the licence step and the local-folder alternative.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightsSource:
    component: str
    name: str
    where: str
    gated: str
    files: str
    use: str
    env: str | None = None
    hub_id: str | None = None


# The components of the paper's model. Gating and licences are as published by their owners.
KNOWN_WEIGHTS: tuple[WeightsSource, ...] = (
    WeightsSource(
        component="morphology encoder",
        name="UNI-2h",
        where="Hugging Face hub MahmoodLab/UNI2-h (timm ViT-g/14, 1536-d)",
        gated="yes: request access on the model page (CC-BY-NC-ND 4.0), then `huggingface-cli login`",
        files="pytorch_model.bin",
        use="TimmMorphologyEncoder.uni2h('MahmoodLab/UNI2-h' or a local folder); CLI: --morphology-encoder PATH",
        env="STMDIT_UNI2H",
        hub_id="MahmoodLab/UNI2-h",
    ),
    WeightsSource(
        component="GE encoder",
        name="CancerFoundation",
        where="the zip linked from github.com/BoevaLab/CancerFoundation (ETH polybox), not on a model hub",
        gated="no (MIT licence); download and unzip by hand",
        files="model.pth, vocab.json, args.json",
        use="CancerFoundationEncoder.from_cancerfoundation(FOLDER); CLI: --ge-encoder FOLDER",
        env="STMDIT_CANCERFOUNDATION",
    ),
    WeightsSource(
        component="VAE",
        name="Stable Diffusion 3.5 VAE",
        where="Hugging Face hub stabilityai/stable-diffusion-3.5-large, subfolder vae",
        gated="yes: accept the Stability AI Community licence on the model page, then `huggingface-cli login`",
        files="vae/config.json, vae/diffusion_pytorch_model.safetensors",
        use="load_vae('stabilityai/stable-diffusion-3.5-large' or a local folder); CLI: --vae PATH",
        env="STMDIT_SD35_VAE",
        hub_id="stabilityai/stable-diffusion-3.5-large",
    ),
    WeightsSource(
        component="FID feature extractor",
        name="Inception v3 (FID, 2048-d pool features)",
        where="github.com/toshas/torch-fidelity releases: weights-inception-2015-12-05-6726825d.pth",
        gated="no; fetched on first use when online, else place the file and name it",
        files="weights-inception-2015-12-05-6726825d.pth",
        use="InceptionFeatures(weights=FILE); `stmdit evaluate --inception-weights FILE`",
        env="STMDIT_INCEPTION_WEIGHTS",
    ),
    WeightsSource(
        component="transformer (warm start)",
        name="PixCell-256",
        where="Hugging Face hub StonyBrook-CVLab/PixCell-256 (diffusers format, subfolder transformer)",
        gated="no",
        files="transformer/config.json, transformer/diffusion_pytorch_model.safetensors",
        use="stmdit.warmstart.load_pixcell('StonyBrook-CVLab/PixCell-256' or a local folder)",
        env="STMDIT_PIXCELL",
        hub_id="StonyBrook-CVLab/PixCell-256",
    ),
)


class WeightsUnavailableError(OSError):
    """Real weights that cannot be found or fetched; the message says how to get them."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _advice(repo_id: str, what: str) -> str:
    return (
        f"Download it on a machine with access (`huggingface-cli download {repo_id}`) and pass the local "
        f"folder instead of the hub id. `stmdit weights` lists where each component comes from. ({what})"
    )


def _translate(err: Exception, repo_id: str, filename: str) -> WeightsUnavailableError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return WeightsUnavailableError(
            f"{repo_id} is gated: request access on https://huggingface.co/{repo_id}, accept its licence and log in "
            f"(`huggingface-cli login`); or " + _advice(repo_id, "gated")
        )
    if isinstance(err, RepositoryNotFoundError):
        return WeightsUnavailableError(
            f"no repository {repo_id!r} on the hub (or it is private); check the id. "
            + _advice(repo_id, "not found")
        )
    if isinstance(err, LocalEntryNotFoundError) or isinstance(err, (ConnectionError, TimeoutError)):
        reason = "HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached"
        return WeightsUnavailableError(
            f"{filename} of {repo_id} is not in the local cache and {reason}. " + _advice(repo_id, "offline")
        )
    return WeightsUnavailableError(
        f"could not fetch {filename} from {repo_id}: {err}. " + _advice(repo_id, type(err).__name__)
    )


def hub_file(repo_id: str, filename: str, subfolder: str | None = None) -> Path:
    """Path of one file of a hub repository (from the cache when offline)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, local_files_only=offline()))
    except Exception as err:  # every hub failure becomes one actionable message
        raise _translate(err, repo_id, f"{subfolder + '/' if subfolder else ''}{filename}") from err


def hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None, revision: str | None = None) -> Path:
    """Local folder with (part of) a hub repository (from the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=offline()
            )
        )
    except Exception as err:  # every hub failure becomes one actionable message
        raise _translate(err, repo_id, ", ".join(allow_patterns or ["files"])) from err


def is_local(source: str | os.PathLike) -> bool:
    """A source is local when it exists on disk. Anything else must look like a hub id
    (``owner/name``); a path that exists nowhere is reported as such."""
    if Path(source).expanduser().exists():
        return True
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise FileNotFoundError(
            f"{source!r} is neither an existing file or folder nor a Hugging Face hub id (owner/name)"
        )
    return False


def locate(source: WeightsSource) -> str | None:
    """Where this component's weights are available without a download, if anywhere: the
    folder named by its environment variable, or the hub cache."""
    if source.env and os.environ.get(source.env):
        path = Path(os.environ[source.env]).expanduser()
        return str(path) if path.exists() else None
    if source.hub_id:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            cache = scan_cache_dir()
        except CacheNotFound:
            return None
        for repo in cache.repos:
            if repo.repo_id == source.hub_id and repo.size_on_disk > 0:
                return str(repo.repo_path)
    return None

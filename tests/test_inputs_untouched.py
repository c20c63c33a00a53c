"""Every command leaves its inputs byte-identical (issue 22).

An input may sit on a read-only share, or be read by several runs at once, so no command may
write into it, not even a temporary file it removes again. Each test runs one ``stmdit``
command through the CLI (typer's ``CliRunner``, in process, so the code path is the CLI's) and
walks its inputs before and after: every file's SHA-256 and modification time, every folder's
modification time (a file created and removed inside a folder changes it) and the set of
names under each input. Commands that only read a prepared store run on the shared session
store itself (``her2st_store``), which is what this proves; a command that wrote into it would
also change it for the tests after this one, so the failure names the shared store.

As root (where these tests run) ``chmod`` does not stop a write, so a read-only folder proves
nothing; the walk works everywhere. :func:`test_evaluate_on_a_read_only_mount` adds a real
read-only file system where mounting is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import HER2ST_SECTIONS, her2st_prepare_config
from stmdit.cli import app

runner = CliRunner()


def _entry(path: Path) -> str:
    if path.is_symlink():
        return f"link to {os.readlink(path)}"
    stat = path.stat()
    if path.is_dir():
        return f"folder, modified {stat.st_mtime_ns}"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"sha256 {digest}, modified {stat.st_mtime_ns}"


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` (a root may be a file) with its content digest or kind and its
    modification time."""
    entries = {}
    for root in map(Path, roots):
        assert root.exists(), f"input {root} does not exist"
        for path in [root, *(sorted(root.rglob("*")) if root.is_dir() else [])]:
            entries[str(path)] = _entry(path)
    return entries


def difference(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What changed between two snapshots, one line per path: added, removed or changed."""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return (
        [f"added: {p}" for p in added]
        + [f"removed: {p}" for p in removed]
        + [f"changed: {p} ({before[p]} -> {after[p]})" for p in changed]
    )


@contextlib.contextmanager
def untouched(what: str, *roots: Path, shared: tuple[Path, ...] = ()):
    """Assert that the block leaves ``roots`` as they were; ``shared`` names the session fixtures
    among them, which a failure has also spoilt for the tests after this one."""
    before = snapshot(*roots)
    yield
    after = snapshot(*roots)
    changes = difference(before, after)
    touched = {Path(k) for k in set(before) ^ set(after) | {k for k in before if before[k] != after.get(k)}}
    spoilt = [str(s) for s in shared if any(t == s or s in t.parents for t in touched)]
    if spoilt:
        changes.insert(
            0, f"(so the shared session fixture {', '.join(spoilt)} is changed for the tests after this)"
        )
    assert not changes, f"{what} wrote into its inputs:\n  " + "\n  ".join(changes)


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def write_config(folder: Path, name: str, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def store_sources(store) -> list[Path]:
    """The folders of the source files a prepared store was made from (its manifest's record of
    them): whole folders, so that a file written beside a source shows too."""
    return sorted({Path(f["path"]).parent for f in store.manifest()["sources"]})


# -- what the commands read ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tiny_pipe, tmp_path_factory) -> Path:
    """The random tiny pipeline of conftest at the store's 32 px, saved (with its model card)."""
    path = tmp_path_factory.mktemp("pipeline") / "pipeline"
    tiny_pipe.save_pretrained(path)
    assert (path / "README.md").is_file()  # the card evaluate used to rewrite
    return path


@pytest.fixture(scope="module")
def predictor(her2st_store, tmp_path_factory) -> Path:
    """A small expression predictor on the store's 32 px tiles (its training split); 128 genes,
    more than the fidelity curve's smallest N (100), so that evaluate computes fidelity."""
    import warnings

    from stmdit.predictor import SpotSet, build_predictor_encoder, save_predictor, train_predictor

    train = SpotSet.from_store(her2st_store, split="train")
    encoder = build_predictor_encoder("stain", train)
    small = {"hidden_dim": 32, "n_phi": 1, "n_rho": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 128 genes is not DeepSpot's protocol: said, known
        fit = train_predictor(
            train, encoder, n_genes=128, epochs=2, seed=0, model_kwargs=small, progress=False
        )
    return save_predictor(fit, encoder, tmp_path_factory.mktemp("predictor") / "predictor")


# -- one test per command ----------------------------------------------------------------------


def test_prepare_reads_its_sources_and_config_only(test_data, tmp_path):
    cfg = her2st_prepare_config(test_data, tmp_path / "out" / "store")
    cfg["samples"] = cfg["samples"][:1]  # one section is enough to read every kind of source
    config = write_config(tmp_path / "config", "prepare.yaml", cfg)
    sources = {Path(cfg["samples"][0][k]).parent for k in ("counts", "spots", "image")}
    with untouched("stmdit prepare", tmp_path / "config", *sources):
        invoke("prepare", config)
    assert (tmp_path / "out" / "store" / "manifest.json").is_file()


def test_encode_writes_into_its_store_only(her2st_store, tmp_path):
    # encode writes into the store it is given (that is its output), so it runs on a copy;
    # what it reads beside it (the store's sources) stays as it was, and so does what the
    # store held before: encode adds features and encoders and updates the manifest, and
    # leaves the prepared spots and tiles alone.
    store = tmp_path / "store"
    shutil.copytree(her2st_store.root, store)
    prepared = [p for p in store.iterdir() if p.name != "manifest.json"]
    assert {"spots.h5ad", "tiles.zarr"} <= {p.name for p in prepared}
    with (
        untouched("stmdit encode", *store_sources(her2st_store)),
        untouched("stmdit encode (the prepared spots and tiles)", *prepared),
    ):
        invoke("encode", store, "--n-genes", "16")
    assert (store / "encoders").is_dir()


def test_train_does_not_write_into_its_dataset(her2st_encoded, tmp_path):
    cfg = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4, "checkpoint_every": 1,
           "data": {"source": "store", "path": str(her2st_encoded)},
           "model": {"preset": "tiny", "patch_size": 8}}  # fmt: skip
    config = write_config(tmp_path / "config", "train.yaml", cfg)
    with untouched("stmdit train", tmp_path / "config", her2st_encoded):
        invoke("train", config)
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_check_does_not_write_into_the_store_it_verifies(her2st_encoded):
    with untouched("stmdit check", her2st_encoded, shared=(her2st_encoded,)):
        assert "intact" in invoke("check", her2st_encoded)


@pytest.mark.filterwarnings("ignore:the predictor does not follow DeepSpot's protocol")
def test_train_predictor_does_not_write_into_its_dataset(her2st_store, tmp_path):
    with untouched(
        "stmdit train-predictor", her2st_store.root, *store_sources(her2st_store), shared=(her2st_store.root,)
    ):
        invoke("train-predictor", her2st_store.root, "--out", tmp_path / "predictor", "--n-genes", "16",
               "--epochs", "1")  # fmt: skip
    assert (tmp_path / "predictor" / "config.json").is_file()


def evaluate_config(folder: Path, out: Path, store: Path, pipeline: Path, predictor: Path) -> Path:
    cfg = {"out": str(out), "dataset": str(store), "models": {"tiny": str(pipeline)}, "predictor": str(predictor),
           "max_spots_per_sample": 8, "seeds": [0], "steps": 1, "ablations": ["null"], "n_bootstrap": 5,
           "kid_subsets": 2, "fd_encoder": "stain", "grid_spots": 2}  # fmt: skip
    return write_config(folder, "eval.yaml", cfg)


def test_evaluate_does_not_write_into_the_pipeline_or_the_dataset(
    her2st_store, pipeline, predictor, tmp_path, monkeypatch
):
    monkeypatch.delenv("STMDIT_INCEPTION_WEIGHTS", raising=False)  # FID/KID skipped: offline and fast
    model = tmp_path / "models" / "tiny"
    shutil.copytree(pipeline, model)  # its own copy: the second run below writes into it
    config = evaluate_config(tmp_path / "config", tmp_path / "report", her2st_store.root, model, predictor)
    inputs = (tmp_path / "config", model, predictor, her2st_store.root, *store_sources(her2st_store))
    with untouched("stmdit evaluate", *inputs, shared=(her2st_store.root,)):
        output = invoke("evaluate", config)
    card = tmp_path / "report" / "model_cards" / "tiny.md"
    assert f"model card of tiny: {card}" in output and "| ge | " in card.read_text()

    # The walk sees a write: asked to, evaluate updates the pipeline's own card, which is then
    # the one change (the generated tiles are cached, so this rerun is quick).
    before = snapshot(*inputs)
    invoke("evaluate", config, "--update-model-card")
    card = model / "README.md"
    assert difference(before, snapshot(*inputs)) == [
        f"changed: {model} ({before[str(model)]} -> {_entry(model)})",  # the atomic write's temporary
        f"changed: {card} ({before[str(card)]} -> {_entry(card)})",
    ]
    assert "| ge | " in (model / "README.md").read_text()


def test_generate_does_not_write_into_the_pipeline_or_the_expression(her2st_store, pipeline, tmp_path):
    spots = her2st_store.spots()
    (tmp_path / "inputs").mkdir()
    spots[spots.obs_names[:3]].copy().write_h5ad(tmp_path / "inputs" / "spots.h5ad")
    with untouched("stmdit generate", pipeline, tmp_path / "inputs"):
        invoke("generate", pipeline, "--expression", tmp_path / "inputs" / "spots.h5ad", "--out",
               tmp_path / "out", "--steps", "1")  # fmt: skip
    assert (tmp_path / "out" / "generated.h5ad").is_file()


def test_section_does_not_write_into_the_pipeline_or_the_dataset(her2st_store, pipeline, tmp_path):
    sample = HER2ST_SECTIONS[-1]
    inputs = (pipeline, her2st_store.root, *store_sources(her2st_store))
    with untouched("stmdit section", *inputs, shared=(her2st_store.root,)):
        invoke("section", pipeline, "--dataset", her2st_store.root, "--sample", sample, "--out", tmp_path / "out",
               "--steps", "1", "--mode", "spots")  # fmt: skip
    assert (tmp_path / "out" / f"{sample}_section.json").is_file()


def test_a_section_edit_does_not_write_into_its_inputs(her2st_store, pipeline, predictor, tmp_path):
    sample = HER2ST_SECTIONS[-1]
    spots = [name for name in map(str, her2st_store.spots().obs_names) if name.startswith(f"{sample}:")][:3]
    edit = write_config(tmp_path / "edit", "edit.yaml", {"region": {"spots": spots}, "anchor": "real", "seeds": [0],
                                                          "changes": [{"genes": ["ERBB2"], "mode": "knockout"}]})  # fmt: skip
    inputs = (pipeline, predictor, tmp_path / "edit", her2st_store.root, *store_sources(her2st_store))
    with untouched("stmdit section --edit", *inputs, shared=(her2st_store.root,)):
        invoke("section", pipeline, "--dataset", her2st_store.root, "--sample", sample, "--out", tmp_path / "out",
               "--steps", "1", "--edit", edit, "--predictor", predictor)  # fmt: skip
    assert (tmp_path / "out" / f"{sample}_edit.json").is_file()


def test_simulate_does_not_write_into_the_pipeline_or_the_data(her2st_store, pipeline, tiny_pipe, tmp_path):
    spot = str(her2st_store.spots().obs_names[her2st_store.rows("test")[0]])
    gene = tiny_pipe.ge_encoder.genes[0]
    cfg = {"pipeline": str(pipeline), "data": str(her2st_store.root), "out": str(tmp_path / "out"), "spot": spot,
           "variants": {"up": [{"genes": [gene], "value": 4.0}]}, "seeds": [0], "steps": 1, "alphas": [1.0]}  # fmt: skip
    config = write_config(tmp_path / "config", "simulate.yaml", cfg)
    inputs = (tmp_path / "config", pipeline, her2st_store.root, *store_sources(her2st_store))
    with untouched("stmdit simulate", *inputs, shared=(her2st_store.root,)):
        invoke("simulate", config)
    assert (tmp_path / "out" / "simulation.json").is_file()


def test_pseudolabel_does_not_write_into_the_predictor_or_the_slides(predictor, test_data, tmp_path):
    slide = test_data / "xenium_deepspot_example" / "NCBI858.jpg"
    cfg = {"predictor": str(predictor), "out": str(tmp_path / "out"),
           "slides": [{"path": str(slide), "mpp": 0.5, "spot_diameter_um": 40, "spacing_um": 60}]}  # fmt: skip
    config = write_config(tmp_path / "config", "pseudolabel.yaml", cfg)
    with untouched("stmdit pseudolabel", tmp_path / "config", predictor, slide.parent):
        invoke("pseudolabel", config)
    assert (tmp_path / "out" / "NCBI858.h5ad").is_file()


# -- a real read-only file system -------------------------------------------------------------


def _read_only_mount(source: Path, target: Path) -> str | None:
    """Bind ``source`` read-only at ``target``; None, or why that cannot be done here."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        return "no mount command"
    target.mkdir(parents=True)
    bind = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True, text=True
    )
    if bind.returncode != 0:
        return f"mount --bind -o ro refused: {bind.stderr.strip() or bind.returncode}"
    if not os.statvfs(target).f_flag & os.ST_RDONLY:
        # An older mount(8) ignores "ro" on a bind; remounting makes it read-only.
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True)
    if not os.statvfs(target).f_flag & os.ST_RDONLY:
        subprocess.run(["umount", "--lazy", str(target)], check=True)
        return "the bind mount stays writable"
    return None


def test_evaluate_on_a_read_only_mount(her2st_store, pipeline, predictor, tmp_path, monkeypatch):
    """Pipeline, predictor and dataset on a read-only file system, as on a shared volume:
    evaluate runs (it once failed there writing the pipeline's card: ``Read-only file system:
    .../pipeline/.README.md....tmp``)."""
    share = tmp_path / "share"
    for name, folder in (("pipeline", pipeline), ("predictor", predictor), ("store", her2st_store.root)):
        shutil.copytree(folder, share / name)
    mounted = tmp_path / "mounted"
    why = _read_only_mount(share, mounted)
    if why is not None:
        pytest.skip(f"no read-only mount here ({why}); the walk of the evaluate test covers this")
    try:
        monkeypatch.delenv("STMDIT_INCEPTION_WEIGHTS", raising=False)
        config = evaluate_config(tmp_path / "config", tmp_path / "report", mounted / "store",
                                 mounted / "pipeline", mounted / "predictor")  # fmt: skip
        invoke("evaluate", config)
        assert (tmp_path / "report" / "model_cards" / "tiny.md").is_file()
        # And the old behaviour fails there, naming the card it could not write.
        result = runner.invoke(app, ["evaluate", str(config), "--update-model-card"])
        assert result.exit_code == 1 and "README.md" in result.output, result.output
    finally:
        # Lazily: this process may still map the weights files (safetensors), which keeps the
        # mount busy; detached now, it goes once they are released.
        subprocess.run(["umount", "--lazy", str(mounted)], check=True)

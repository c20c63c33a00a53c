"""Malformed input through the command line: every case must end with a clear message.

Each case writes its inputs into a folder of its own, runs one ``stmdit`` command there and
asserts: the exit status (1 for bad input, 2 for a usage error caught by the option parser),
no traceback, a message that names the file, the key or the option, and no file written
anywhere but the case's output folder ``out/``.

Most cases run in-process through typer's ``CliRunner`` (a subprocess per case would cost a
few seconds of imports each). A representative handful (a YAML syntax error, a truncated
gzip counts file, a NaN guidance scale, a missing pipeline folder, and ``--verbose``) also run
as real ``python -m stmdit`` subprocesses, to check what a user's terminal shows: the exit
status, stderr, and no ``Aborted!``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from stmdit.cli import app

runner = CliRunner()

SMALL_TRAINING = {
    "data": {"source": "synthetic", "n_sections": 2, "grid": 4, "tile_size": 16, "n_genes": 12},
    "model": {"preset": "tiny", "patch_size": 4},
    "batch_size": 4,
}


@dataclass
class Case:
    name: str
    argv: list[str]  # "{data}" is the shared test data folder, "{pipeline}" a trained pipeline
    files: dict[str, str | bytes] = field(default_factory=dict)  # may also use "{data}"
    expect: list[str] = field(default_factory=list)  # substrings of the message
    code: int = 1


def yaml_case(name: str, command: str, text: str, expect: list[str], code: int = 1) -> Case:
    """A config file ``c.yaml`` holding ``text``; its name is always expected in the message."""
    return Case(name, [command, "c.yaml"], {"c.yaml": text}, ["c.yaml", *expect], code)


def legacy_st(**changes) -> str:
    """A prepare config reading her2st C2, with reader arguments changed or removed (None)."""
    sample = {
        "format": "legacy_st",
        "counts": "{data}/her2st/C2/counts.tsv.gz",
        "spots": "{data}/her2st/C2/spots.tsv",
        "image": "{data}/her2st/C2/he.jpg",
        "sample_id": "C2",
    }
    sample.update(changes)
    sample = {k: v for k, v in sample.items() if v is not None}
    return yaml.safe_dump({"out": "out", "samples": [sample], "tile_px": 32})


EVALUATE = "out: out\ndataset: ds\nmodels: {a: pipe}\n"
SIMULATE = "pipeline: pipe\ndata: d.h5ad\nout: out\nspot: s1\n"
PSEUDOLABEL = "predictor: pred\nout: out\n"

CASES = [
    # -- training configs --------------------------------------------------------------------
    yaml_case(
        "yaml_syntax",
        "train",
        "model: {preset: tiny\nmax_steps: 3\n",
        ["YAML syntax error at line 2, column"],
    ),
    yaml_case("train_not_a_mapping", "train", "- 1\n- 2\n", ["must be a mapping"]),
    yaml_case("batch_size_text", "train", 'batch_size: "32"\n', ["line 1: batch_size", "'32'"]),
    yaml_case("learning_rate_word", "train", "learning_rate: fast\n", ["learning_rate", "'fast'"]),
    yaml_case("learning_rate_nan", "train", "learning_rate: .nan\n", ["learning_rate", "finite"]),
    yaml_case("model_as_string", "train", "model: tiny\n", ["model: expected a mapping", "'tiny'"]),
    yaml_case(
        "model_unknown_key",
        "train",
        "model:\n  preset: tiny\n  hiden_size: 8\n",
        ["line 3: model.hiden_size: unknown key", "did you mean 'hidden_size'"],
    ),
    yaml_case("model_unknown_preset", "train", "model: {preset: huge}\n", ["model.preset", "'huge'"]),
    yaml_case("ema_decay_above_1", "train", "ema_decay: 5.0\n", ["ema_decay", "less than 1", "5.0"]),
    yaml_case("probability_above_1", "train", "p_drop_ge: 1.5\n", ["p_drop_ge", "1.5"]),
    yaml_case("max_steps_zero", "train", "max_steps: 0\n", ["max_steps", "greater than or equal to 1"]),
    yaml_case("mixed_precision_unknown", "train", "mixed_precision: fp8\n", ["mixed_precision", "'fp8'"]),
    yaml_case("lr_schedule_unknown", "train", "lr_schedule: cosinus\n", ["lr_schedule", "'cosinus'"]),
    yaml_case(
        "train_unknown_key", "train", "learning_rat: 0.1\n", ["learning_rat", "did you mean 'learning_rate'"]
    ),
    yaml_case(
        "data_source_unknown",
        "train",
        "data: {source: hdf5}\n",
        ["data: source must be 'synthetic' or 'store'"],
    ),
    yaml_case(
        "data_synthetic_unknown_key",
        "train",
        "data: {source: synthetic, n_section: 2}\n",
        ["data.n_section: unknown key", "did you mean 'n_sections'"],
    ),
    yaml_case(
        "data_store_missing",
        "train",
        "data: {source: store, path: nowhere}\n",
        ["data.path: nowhere is not a prepared dataset", "stmdit prepare"],
    ),
    yaml_case(
        "data_store_no_path", "train", "data: {source: store}\n", ["data.path: required key is missing"]
    ),
    Case(
        "loss_overflow",
        ["train", "c.yaml"],
        {
            "c.yaml": yaml.safe_dump(
                {
                    **SMALL_TRAINING,
                    "output_dir": "out",
                    "learning_rate": 1e30,
                    "warmup_steps": 0,
                    "max_steps": 20,
                }
            )
        },
        ["loss became", "at step", "(learning_rate 1e+30); lower learning_rate"],
    ),
    # -- prepare configs ---------------------------------------------------------------------
    yaml_case(
        "tile_px_text", "prepare", legacy_st().replace("tile_px: 32", 'tile_px: "abc"'), ["tile_px", "'abc'"]
    ),
    yaml_case(
        "tile_px_fraction",
        "prepare",
        legacy_st().replace("tile_px: 32", "tile_px: 32.7"),
        ["tile_px", "32.7"],
    ),
    yaml_case("tile_um_quoted", "prepare", legacy_st() + 'tile_um: "128"\n', ["tile_um", "'128'"]),
    yaml_case(
        "reader_argument_misspelled",
        "prepare",
        legacy_st(image=None, imag="{data}/her2st/C2/he.jpg"),
        ["samples.0", "imag: unknown key", "did you mean 'image'", "image: required key is missing"],
    ),
    yaml_case(
        "reader_argument_missing",
        "prepare",
        legacy_st(spots=None),
        ["samples.0", "spots: required key is missing"],
    ),
    yaml_case(
        "reader_argument_wrong_type", "prepare", legacy_st(sample_id=7), ["samples.0", "sample_id", "7"]
    ),
    yaml_case(
        "sample_format_unknown",
        "prepare",
        legacy_st(format="visum"),
        ["samples.0", "unknown sample format 'visum'"],
    ),
    yaml_case("sample_not_a_mapping", "prepare", "out: out\nsamples: [visium]\n", ["samples.0", "'visium'"]),
    yaml_case("samples_empty", "prepare", "out: out\nsamples: []\n", ["samples", "at least 1"]),
    yaml_case(
        "split_fractions_sum",
        "prepare",
        legacy_st() + "split_fractions: [0.5, 0.6, 0]\n",
        ["split_fractions must sum to 1"],
    ),
    yaml_case("min_tissue_above_1", "prepare", legacy_st() + "min_tissue: 2\n", ["min_tissue", "2"]),
    yaml_case("prepare_no_out", "prepare", "samples: []\n", ["out: required key is missing"]),
    Case(
        "counts_file_missing",
        ["prepare", "c.yaml"],
        {"c.yaml": legacy_st(counts="missing.tsv.gz")},
        ["missing.tsv.gz"],
    ),
    Case(
        "image_not_an_image",
        ["prepare", "c.yaml"],
        {"c.yaml": legacy_st(image="he.jpg"), "he.jpg": "not an image\n"},
        ["he.jpg", "cannot decode"],
    ),
    Case(
        "image_truncated_jpeg",
        ["prepare", "c.yaml"],
        {"c.yaml": legacy_st(image="cut.jpg"), "cut.jpg": "{jpeg_head}"},
        ["cut.jpg"],
    ),
    Case(
        "counts_truncated_gzip",
        ["prepare", "c.yaml"],
        {"c.yaml": legacy_st(counts="cut.tsv.gz"), "cut.tsv.gz": "{gzip_head}"},
        [],
    ),
    # -- evaluate, pseudolabel and simulate configs -----------------------------------------
    yaml_case("evaluate_no_seeds", "evaluate", EVALUATE + "seeds: []\n", ["seeds", "at least 1"]),
    yaml_case(
        "evaluate_no_models", "evaluate", "out: out\ndataset: ds\nmodels: {}\n", ["models", "at least 1"]
    ),
    yaml_case(
        "evaluate_unknown_ablation", "evaluate", EVALUATE + "ablations: [zero]\n", ["ablations.0", "'zero'"]
    ),
    yaml_case(
        "evaluate_unsafe_model_name",
        "evaluate",
        "out: out\ndataset: ds\nmodels: {'../x': pipe}\n",
        ["'../x' cannot be a folder name"],
    ),
    yaml_case(
        "evaluate_no_dataset", "evaluate", "out: out\nmodels: {a: b}\n", ["dataset: required key is missing"]
    ),
    yaml_case(
        "evaluate_steps_zero", "evaluate", EVALUATE + "steps: 0\n", ["steps", "greater than or equal to 1"]
    ),
    yaml_case("pseudolabel_no_slides", "pseudolabel", PSEUDOLABEL + "slides: []\n", ["slides", "at least 1"]),
    yaml_case(
        "pseudolabel_bad_fraction",
        "pseudolabel",
        PSEUDOLABEL + "slides: [a.jpg]\nmin_tissue_fraction: 2\n",
        ["min_tissue_fraction", "2"],
    ),
    yaml_case(
        "pseudolabel_slide_unknown_key",
        "pseudolabel",
        PSEUDOLABEL + "slides: [{pth: a.jpg}]\n",
        ["slides.0.pth: unknown key", "did you mean 'path'"],
    ),
    yaml_case("simulate_no_seeds", "simulate", SIMULATE + "seeds: []\n", ["seeds", "at least 1"]),
    yaml_case(
        "simulate_bad_mode",
        "simulate",
        SIMULATE + "variants: {up: [{genes: [A], mode: double}]}\n",
        ["variants", "'up'", "mode must be one of"],
    ),
    yaml_case(
        "simulate_unknown_change_key",
        "simulate",
        SIMULATE + "variants: {up: [{gene: [A]}]}\n",
        ["variant 'up'", "unknown keys ['gene']"],
    ),
    yaml_case("simulate_alpha_above_1", "simulate", SIMULATE + "alphas: [2]\n", ["alphas.0", "2"]),
    yaml_case(
        "simulate_no_pipeline", "simulate", "data: d.h5ad\nout: out\n", ["pipeline: required key is missing"]
    ),
    yaml_case(
        "simulate_target_unknown_key",
        "simulate",
        SIMULATE + "interpolate_to: {sampel: b}\n",
        ["interpolate_to.sampel: unknown key", "did you mean 'sample'"],
    ),
    # -- command-line options: usage errors (exit 2) that name the option ----------------------
    Case("encode_n_genes_negative", ["encode", "ds", "--n-genes", "-5"], expect=["--n-genes"], code=2),
    Case("encode_batch_size_zero", ["encode", "ds", "--batch-size", "0"], expect=["--batch-size"], code=2),
    Case(
        "generate_steps_zero",
        ["generate", "pipe", "--steps", "0", "--out", "out"],
        expect=["--steps"],
        code=2,
    ),
    Case(
        "generate_guidance_nan",
        ["generate", "pipe", "--guidance-ge", "nan", "--out", "out"],
        expect=["--guidance-ge", "finite"],
        code=2,
    ),
    Case(
        "generate_images_zero",
        ["generate", "pipe", "--images-per-spot", "0", "--out", "out"],
        expect=["--images-per-spot"],
        code=2,
    ),
    Case(
        "train_max_steps_zero",
        ["train", "c.yaml", "--max-steps", "0"],
        {"c.yaml": "{}\n"},
        ["--max-steps"],
        2,
    ),
    Case(
        "section_steps_zero",
        ["section", "pipe", "--dataset", "ds", "--sample", "a", "--out", "out", "--steps", "0"],
        expect=["--steps"],
        code=2,
    ),
    Case(
        "serve_port_out_of_range",
        ["serve", "pipe", "--data", "d", "--port", "70000"],
        expect=["--port"],
        code=2,
    ),
    # -- missing or unreadable inputs --------------------------------------------------------
    Case(
        "generate_missing_pipeline",
        ["generate", "runs/nowhere/pipeline", "--out", "out"],
        expect=["runs/nowhere/pipeline", "does not exist"],
    ),
    Case(
        "generate_expression_not_h5ad",
        ["generate", "pipe", "--expression", "x.h5ad", "--out", "out"],
        {"x.h5ad": "spot,gene\n"},
        ["x.h5ad", "cannot be read as an AnnData file"],
    ),
    Case("encode_missing_dataset", ["encode", "nowhere"], expect=["nowhere", "stmdit prepare"]),
    Case(
        "generate_expression_without_spots",
        ["generate", "pipe", "--expression", "empty.h5ad", "--out", "out"],
        {"empty.h5ad": "{h5ad_no_spots}"},
        ["empty.h5ad", "no spots", "one row per spot"],
    ),
    Case(
        "simulate_data_not_hdf5",
        ["simulate", "c.yaml"],
        {"c.yaml": SIMULATE, "d.h5ad": "spot,gene\ns1,3\n"},
        ["d.h5ad", "not an HDF5 file", "written by anndata", "prepared dataset folder"],
    ),
]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _materialise(case: Case, folder: Path, test_data: Path) -> list[str]:
    folder.mkdir(parents=True)
    for name, content in case.files.items():
        if content == "{jpeg_head}":  # the first 60 % of a real JPEG: decodable header, data cut off
            whole = (test_data / "her2st" / "C2" / "he.jpg").read_bytes()
            content = whole[: int(len(whole) * 0.6)]
        elif content == "{gzip_head}":  # a gzip stream cut in the middle
            whole = (test_data / "her2st" / "C2" / "counts.tsv.gz").read_bytes()
            content = whole[: len(whole) // 2]
        elif content == "{h5ad_no_spots}":  # a well-formed AnnData with genes but not one spot
            ad.AnnData(np.zeros((0, 3), np.float32), var=pd.DataFrame(index=["A", "B", "C"])).write_h5ad(
                folder / name
            )
            continue
        elif isinstance(content, str):
            content = content.replace("{data}", str(test_data)).encode()
        (folder / name).write_bytes(content)
    return [a.replace("{data}", str(test_data)) for a in case.argv]


def _check(case: Case, folder: Path, code: int, output: str, before: dict[str, int]) -> None:
    assert code == case.code, output
    assert "Traceback" not in output, output
    assert "Aborted" not in output, output
    assert output.strip(), "no message at all"
    for text in case.expect:
        assert text in output, f"{text!r} not in: {output}"
    after = _files(folder.parent)
    changed = {k for k, v in after.items() if before.get(k) != v}
    outside = {k for k in changed if not k.startswith(f"{folder.name}/out/")}
    assert not outside, f"written outside the output folder: {sorted(outside)}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_a_clear_error(case, tmp_path, test_data, monkeypatch):
    folder = tmp_path / case.name
    argv = _materialise(case, folder, test_data)
    monkeypatch.chdir(folder)
    before = _files(tmp_path)
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check(case, folder, result.exit_code, result.output, before)


def test_there_are_at_least_forty_cases():
    assert len({c.name for c in CASES}) == len(CASES) >= 40


SUBPROCESS_CASES = [
    "yaml_syntax",
    "counts_truncated_gzip",
    "generate_guidance_nan",
    "generate_missing_pipeline",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_a_real_terminal_shows_one_message_and_no_traceback(name, tmp_path, test_data):
    case = next(c for c in CASES if c.name == name)
    folder = tmp_path / case.name
    argv = _materialise(case, folder, test_data)
    before = _files(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "stmdit", *argv],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.stderr.count("error:") + proc.stderr.count("Usage:") == 1, proc.stderr  # one message
    _check(case, folder, proc.returncode, proc.stdout + proc.stderr, before)


@pytest.mark.slow
def test_verbose_adds_the_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: fast\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stmdit", "train", "c.yaml", "--verbose"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "c.yaml, line 1: learning_rate" in proc.stderr


# -- names from the data never leave the output folder ------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline")
    config = {**SMALL_TRAINING, "output_dir": str(folder / "run"), "max_steps": 1, "checkpoint_every": 1}
    (folder / "train.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", str(folder / "train.yaml")])
    assert result.exit_code == 0, result.output
    return folder / "run" / "pipeline"


def test_spot_names_with_path_parts_stay_inside_the_output_folder(pipeline, tmp_path, monkeypatch):
    from stmdit.data.synthetic import simulate_tissue

    adata = simulate_tissue(n_sections=1, grid=2, tile_size=16, seed=3).adata
    escape = f"/tmp/stmdit-escape-{uuid.uuid4().hex[:8]}"
    adata.obs_names = ["../../x", escape, "a/b", "a_b"]
    work = tmp_path / "work"
    work.mkdir()
    adata.write_h5ad(work / "spots.h5ad")
    monkeypatch.chdir(work)
    before = _files(tmp_path)
    result = runner.invoke(
        app, ["generate", str(pipeline), "--expression", "spots.h5ad", "--out", "out", "--steps", "1"]
    )
    assert result.exit_code == 0, result.output
    assert not Path(escape + "_0.png").exists() and not (tmp_path / "x_0.png").exists()
    changed = {k for k, v in _files(tmp_path).items() if before.get(k) != v}
    assert changed and all(k.startswith("work/out/") for k in changed), sorted(changed)
    tiles = sorted(p.name for p in (work / "out" / "tiles").iterdir())
    assert len(tiles) == 4 and "a_b_0.png" in tiles  # a clean name is kept as it is
    import anndata as ad

    generated = ad.read_h5ad(work / "out" / "generated.h5ad")
    assert list(generated.obs["spot"]) == list(adata.obs_names)  # the names themselves are kept
    assert all((work / "out" / p).is_file() for p in generated.obs["tile_path"])


@pytest.mark.parametrize(
    "name", ["../../x", "/tmp/x", "..", ".hidden", "a/../../b", "", "C:\\\\x", "ok-1.2_x"]
)
def test_safe_file_name_keeps_every_name_inside_the_folder(tmp_path, name):
    from stmdit.io import path_inside, safe_file_name

    path = path_inside(tmp_path, name, suffix=".png")
    assert path.parent == tmp_path and path.resolve().is_relative_to(tmp_path.resolve())
    assert not path.name.startswith(".") and "/" not in safe_file_name(name)
    assert (safe_file_name(name) == name) == (name == "ok-1.2_x")


def test_safe_file_names_of_different_names_differ():
    from stmdit.io import safe_file_name

    names = ["a/b", "a_b", "a b", "a:b", "../a_b"]
    assert len({safe_file_name(n) for n in names}) == len(names)


def test_a_symlinked_folder_cannot_lead_outside(tmp_path):
    from stmdit.errors import UnsafePathError
    from stmdit.io import path_inside

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiles").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside the output folder"):
        path_inside(tmp_path / "out", "tiles", "x", suffix=".png")


def test_corrupt_weights_files_name_the_file(tmp_path):
    from stmdit.errors import InputFileError
    from stmdit.io import load_state_dict_file

    for name, content in [
        ("w.pth", b"not a checkpoint"),
        ("w.safetensors", b"\x00" * 16),
        ("w.pt", np.arange(40, dtype=np.uint8).tobytes()),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputFileError, match=rf"{name}: not a readable"):
            load_state_dict_file(tmp_path / name)


def test_the_message_gets_its_own_line_beside_an_open_progress_bar(tmp_path, test_data):
    """A failure inside a loop with a progress bar: the bar is cleared before the message, so
    the message starts a line instead of trailing the bar."""
    case = next(c for c in CASES if c.name == "counts_truncated_gzip")
    folder = tmp_path / case.name
    argv = _materialise(case, folder, test_data)
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run(
        [sys.executable, "-m", "stmdit", *argv],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1 and "reading samples" in proc.stderr, proc.stderr  # a bar was open
    lines = proc.stderr.replace("\r", "\n").splitlines()
    assert [line for line in lines if line.startswith("error: ")], proc.stderr

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_two_processes
from stmdit.data.features import FeatureDataset
from stmdit.data.loading import StepBatchSampler
from stmdit.errors import ConfigError, TrainingDiverged
from stmdit.train import (
    ConfigMismatchError,
    CorruptCheckpointError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    find_checkpoints,
    make_ema,
)


def dataset(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FeatureDataset(latents=torch.randn(n, 3, 8, 8, generator=g), morphology=torch.randn(n, 6, generator=g),
                          ge=torch.randn(n, 5, generator=g))  # fmt: skip


def config(tmp_path, name="run", **kw):
    base = {"output_dir": str(tmp_path / name), "model": {"preset": "tiny", "patch_size": 2}, "max_steps": 6,
            "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 2, "checkpoint_every": 2, "log_every": 1}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


def test_step_sampler_is_deterministic_covers_epochs_and_shards():
    s = StepBatchSampler(10, 4, seed=3, max_steps=5)
    batches = [s.global_batch(i) for i in range(5)]
    flat = [int(i) for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert StepBatchSampler(10, 4, seed=3).global_batch(2).tolist() == batches[2].tolist()
    shards = [list(StepBatchSampler(10, 4, 3, 1, 2, p, 2)) for p in range(2)]
    assert sorted(shards[0][0] + shards[1][0]) == sorted(batches[1].tolist())
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        StepBatchSampler(10, 5, 0, num_processes=2)


def test_training_writes_config_checkpoints_losses_and_a_pipeline(tmp_path):
    cfg = config(tmp_path, sample_every=3, sample_spots=2, sample_steps=2, keep_checkpoints=2)
    result = Trainer(cfg, dataset(), progress=False).run()
    run = Path(cfg.output_dir)
    assert result.final_step == 6 and len(result.losses) == 6
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 6
    assert [p.name for p in find_checkpoints(run)] == ["step_00000004", "step_00000006"]  # keep the last 2
    ckpt = find_checkpoints(run)[-1]
    assert {p.name for p in ckpt.iterdir()} == {
        "transformer",
        "ema.safetensors",
        "training_state.pt",
        "trainer_state.json",
    }
    assert (run / "samples" / "step_00000006.png").exists()
    assert (run / "pipeline" / "model_index.json").exists()
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    assert len(losses(run)) == 6


def test_resume_after_interruption_reproduces_the_uninterrupted_losses(tmp_path):
    data = dataset()
    full = Trainer(config(tmp_path, "full"), data, progress=False).run()
    # "Crash" after step 4 (the last checkpoint), with a half-written checkpoint left behind.
    Trainer(config(tmp_path, "resumed", max_steps=4), data, progress=False).run()
    stale = tmp_path / "resumed" / "checkpoints" / ".step_00000006.abc.tmp"
    stale.mkdir()
    resumed = Trainer(config(tmp_path, "resumed"), data, progress=False).run()
    assert resumed.final_step == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # exact, step for step
    assert [round(v, 12) for _, v in resumed.losses] == [round(v, 12) for _, v in full.losses]
    a = torch.load(find_checkpoints(tmp_path / "full")[-1] / "training_state.pt", weights_only=True)
    b = torch.load(find_checkpoints(tmp_path / "resumed")[-1] / "training_state.pt", weights_only=True)
    for ka, kb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(ka["exp_avg"], kb["exp_avg"], rtol=0, atol=0)


def test_resume_refuses_a_folder_from_another_config(tmp_path):
    Trainer(config(tmp_path, max_steps=2), dataset(), progress=False).run()
    with pytest.raises(ConfigMismatchError, match=r"learning_rate: 0.001 \(saved\) vs 0.01 \(now\)"):
        Trainer(config(tmp_path, learning_rate=1e-2), dataset(), progress=False).run()
    # ... unless asked to start over.
    Trainer(config(tmp_path, learning_rate=1e-2, max_steps=2), dataset(), resume=False, progress=False).run()


def test_resume_skips_a_corrupt_newest_checkpoint_and_removes_stale_temporaries(tmp_path, caplog):
    data = dataset()
    full = Trainer(config(tmp_path, "full"), data, progress=False).run()
    # Checkpoints at steps 2 and 4; then the one at 4 is damaged (a crash, a bad disk) and
    # crashed saves left temporaries behind in the run and checkpoint folders.
    Trainer(config(tmp_path, "run", max_steps=4, keep_checkpoints=2), data, progress=False).run()
    run = tmp_path / "run"
    (find_checkpoints(run)[-1] / "ema.safetensors").write_bytes(b"not a safetensors file")
    stale = [run / "checkpoints" / ".step_00000006.k2j3.tmp", run / ".pipeline.x8a1.tmp"]
    for folder in stale:
        (folder / "transformer").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="stmdit.train"):
        resumed = Trainer(config(tmp_path, "run", keep_checkpoints=2), data, progress=False).run()
    assert "step_00000004 is incomplete or corrupt" in caplog.text
    assert not any(folder.exists() for folder in stale)
    assert (run / "checkpoints" / "step_00000004.corrupt").is_dir()  # set aside, not deleted
    # Resumed from step 2: the same losses as a run that was never interrupted.
    assert resumed.final_step == 6
    assert losses(run) == losses(tmp_path / "full")
    assert [v for _, v in resumed.losses] == [v for _, v in full.losses]


def test_resume_with_no_intact_checkpoint_fails_clearly(tmp_path):
    cfg = config(tmp_path, max_steps=2)
    Trainer(cfg, dataset(), progress=False).run()
    (find_checkpoints(cfg.output_dir)[-1] / "ema.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptCheckpointError, match=r"no intact checkpoint .*step_00000002.*--no-resume"):
        Trainer(config(tmp_path, max_steps=4), dataset(), progress=False).run()


def test_a_diverging_loss_names_the_step_and_the_learning_rate(tmp_path):
    with pytest.raises(
        TrainingDiverged,
        match=r"loss became (nan|inf) at step \d+ \(learning_rate 1e\+30\); lower learning_rate",
    ):
        Trainer(config(tmp_path, learning_rate=1e30, warmup_steps=0), dataset(), progress=False).run()


def test_stop_request_writes_a_checkpoint_and_resumes(tmp_path):
    data = dataset()

    class StopsEarly(Trainer):
        def _stop_requested_anywhere(self, accelerator):
            return self._done_steps() >= 3

        def _done_steps(self):
            return len(losses(self.run_dir))

    with pytest.raises(TrainingInterrupted, match="interrupted at step 3") as stop:
        StopsEarly(config(tmp_path, checkpoint_every=100), data, progress=False).run()
    assert stop.value.checkpoint.name == "step_00000003"
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert not (tmp_path / "run" / "pipeline").exists()
    second = Trainer(config(tmp_path, checkpoint_every=100), data, progress=False).run()
    assert second.final_step == 6 and second.pipeline_dir is not None


def test_bf16_mixed_precision_trains(tmp_path):
    result = Trainer(config(tmp_path, max_steps=3, mixed_precision="bf16"), dataset(), progress=False).run()
    assert result.final_step == 3 and all(0 < v < 10 for _, v in result.losses)


def test_v_prediction_and_ema_power_reach_the_saved_pipeline(tmp_path):
    cfg = config(tmp_path, max_steps=2, prediction_type="v_prediction", ema_power=0.75)
    Trainer(cfg, dataset(), progress=False).run()
    saved = json.loads(
        (Path(cfg.output_dir) / "pipeline" / "scheduler" / "scheduler_config.json").read_text()
    )
    assert saved["prediction_type"] == "v_prediction"  # so the pipeline samples with v

    # The EMA decay after n optimisation steps (diffusers counts the first update as step 0).
    def decays(ema):
        return [ema.get_decay(n + 1) for n in (1, 10, 400, 100_000)]

    weights = [torch.nn.Parameter(torch.zeros(1))]
    powered = decays(make_ema(weights, cfg))
    assert powered == pytest.approx([min(0.999, 1 - (1 + n) ** -0.75) for n in (1, 10, 400, 100_000)])
    default = decays(make_ema(weights, config(tmp_path)))
    assert default == pytest.approx([min(0.999, (1 + n) / (10 + n)) for n in (1, 10, 400, 100_000)])
    assert powered[2] > default[2]  # a longer average at the demo's length


def test_config_rejects_bad_values_and_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="p_drop_ge"):
        TrainConfig(p_drop_ge=2.0)
    path = tmp_path / "c.yaml"
    path.write_text("max_step: 10\nmodel:\n  preset: tiny\n  hiden_size: 8\nema_decay: 5.0\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(path)
    message = str(err.value)
    assert f"{path}, line 1: max_step: unknown key (did you mean 'max_steps'?)" in message
    assert f"{path}, line 4: model.hiden_size: unknown key (did you mean 'hidden_size'?)" in message
    assert f"{path}, line 5: ema_decay: input should be less than 1; got 5.0" in message
    with pytest.raises(ValueError, match="model.in_channels is 4 in the config but the training data has 3"):
        Trainer(config(tmp_path, model={"preset": "tiny", "in_channels": 4}), dataset(), progress=False).run()


def test_config_reads_yaml_1_2_floats_and_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nmodel: {preset: S, depth: 2}\ndata: {source: synthetic, grid: 4}\n")
    cfg = TrainConfig.from_yaml(path, max_steps=7)
    assert cfg.learning_rate == 1e-4 and cfg.max_steps == 7
    assert cfg.to_dict()["model"] == {"preset": "S", "depth": 2}
    assert cfg.to_dict()["data"] == {"source": "synthetic", "grid": 4}
    (tmp_path / "again.yaml").write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "again.yaml") == cfg


@pytest.mark.slow
def test_two_process_accelerate_run_completes(tmp_path):
    cfg = config(tmp_path, "ddp", max_steps=4, batch_size=8, checkpoint_every=2).to_dict()
    cfg["data"] = {"source": "synthetic", "n_sections": 2, "grid": 6, "tile_size": 16, "n_genes": 16}
    cfg["model"] = {"preset": "tiny", "patch_size": 4}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_two_processes("train", str(path), launcher="accelerate")
    run = tmp_path / "ddp"
    assert json.loads((find_checkpoints(run)[-1] / "trainer_state.json").read_text())["processes"] == 2
    assert [p.name for p in find_checkpoints(run)][-1] == "step_00000004"
    assert len(losses(run)) == 4
    assert (run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert "pipeline saved" in proc.stdout


def test_a_cpu_launch_that_started_one_process_says_how_to_start_several(monkeypatch, caplog):
    import logging

    from stmdit.distributed import process_state

    # What `accelerate launch --cpu --num_processes 2` leaves in the one process it starts.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="stmdit.distributed"):
        state = process_state()
    assert state.num_processes == 1
    assert "torchrun --nproc_per_node N" in caplog.text


def test_a_no_ge_model_warm_starts_a_ge_model(tmp_path):
    from stmdit import STMDiT

    data = dataset()
    no_ge_cfg = config(
        tmp_path, "no_ge", max_steps=2, model={"preset": "tiny", "patch_size": 2, "ge_injection": "none"}
    )
    base = Trainer(no_ge_cfg, data, progress=False).run()

    def start_from(name, **kw):
        kw = {"init_from": str(base.pipeline_dir), "model": {"ge_injection": "adaln+xattn"}, **kw}
        cfg = config(tmp_path, name, **kw)
        return STMDiT.from_pretrained(Trainer(cfg, data, progress=False).run().pipeline_dir / "transformer")

    no_ge = STMDiT.from_pretrained(base.pipeline_dir / "transformer")
    start = start_from("start", max_steps=1, warmup_steps=10)  # one step at learning rate 0
    tuned = start_from("tuned", max_steps=4, warmup_steps=1)
    assert no_ge.config.ge_injection == "none" and start.config.ge_injection == "adaln+xattn"
    g = torch.Generator().manual_seed(1)
    x, m, ge = (
        torch.randn(3, 3, 8, 8, generator=g),
        torch.randn(3, 6, generator=g),
        torch.randn(3, 5, generator=g) * 5,
    )
    t = torch.tensor([10.0, 400.0, 900.0])
    with torch.no_grad():
        reference = no_ge(x, t, morphology=m)
        torch.testing.assert_close(start(x, t, morphology=m, ge=ge), reference, atol=1e-6, rtol=1e-6)
        assert (tuned(x, t, morphology=m, ge=ge) - reference).abs().max() > 1e-3  # fine-tuning moved it
    with pytest.raises(FileNotFoundError, match="no STMDiT pipeline or transformer folder"):
        start_from("missing", init_from=str(tmp_path / "nowhere"))


def test_a_warm_start_that_changes_the_prediction_target_warns(tmp_path, caplog):
    import logging

    base = Trainer(config(tmp_path, "eps", max_steps=1), dataset(), progress=False).run()
    with caplog.at_level(logging.WARNING, logger="stmdit.train"):
        Trainer(config(tmp_path, "same", max_steps=1, init_from=str(base.pipeline_dir)), dataset(),
                progress=False).run()  # fmt: skip
        assert "trained to predict" not in caplog.text
        Trainer(config(tmp_path, "v", max_steps=1, init_from=str(base.pipeline_dir), prediction_type="v_prediction"),
                dataset(), progress=False).run()  # fmt: skip
    assert "trained to predict epsilon; prediction_type v_prediction" in caplog.text


def test_init_from_must_fit_the_data(tmp_path):
    base = Trainer(config(tmp_path, "base", max_steps=1), dataset(), progress=False).run()
    wider = FeatureDataset(
        latents=torch.randn(8, 3, 8, 8), morphology=torch.randn(8, 7), ge=torch.randn(8, 5)
    )
    with pytest.raises(ValueError, match=r"shape mismatch for 'y_embedder\."):
        Trainer(config(tmp_path, "wider", init_from=str(base.pipeline_dir)), wider, progress=False).run()

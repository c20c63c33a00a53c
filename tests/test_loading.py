"""How batches come off a store: block-shuffled order, in-memory rows, and exact resume with
either (stmdit.data.loading)."""

import numpy as np
import pytest
import torch

from stmdit.data.features import StoreDataset
from stmdit.data.loading import BlockBatchSampler, StepBatchSampler, choose_access, split_steps
from stmdit.data.sources import load_training_data
from stmdit.train import TrainConfig, Trainer


def _steps(sampler, per_step):
    """The per-step index lists a sampler's requests hold."""
    return [item[a : a + per_step] for item in sampler for a in range(0, len(item), per_step)]


def test_block_order_mixes_many_chunks_and_each_epoch_is_a_permutation():
    chunk_of = np.arange(100_000) // 64  # a store of 100k rows in chunks of 64
    sampler = BlockBatchSampler(chunk_of, 256, seed=1, max_steps=10)
    distinct = [len(np.unique(chunk_of[sampler.global_batch(s)])) for s in range(40)]
    assert min(distinct) >= 32
    assert sorted(sampler._epoch(0).tolist()) == list(range(100_000))
    assert not np.array_equal(sampler._epoch(0), sampler._epoch(1))
    # Contrast: the rows of one batch are confined to its block (fully random would spread over
    # ~250 chunks), which is what lets a request decompress each chunk once.
    steps = range(sampler.steps_per_read)
    assert len(np.unique(np.concatenate([chunk_of[sampler.global_batch(s)] for s in steps]))) <= 33
    assert sampler.steps_per_read == 32 * 64 // 256


def test_block_order_resumes_exactly_and_shards_across_processes():
    chunk_of = np.repeat(np.arange(40), 25)
    full = _steps(BlockBatchSampler(chunk_of, 8, seed=3, block_chunks=4, max_steps=60), 8)
    assert len(full) == 60
    for start in (1, 12, 13, 59):  # inside and at the edges of a request's group of steps
        resumed = _steps(
            BlockBatchSampler(chunk_of, 8, seed=3, block_chunks=4, start_step=start, max_steps=60), 8
        )
        assert resumed == full[start:]
    # Two processes: each reads its own pieces (whole chunks), together every example once an
    # epoch (960 examples = 10 requests of 12 steps of 8).
    chunk_of = np.repeat(np.arange(40), 24)
    samplers = [BlockBatchSampler(chunk_of, 8, 3, block_chunks=4, max_steps=120, process_index=p, num_processes=2)
                for p in range(2)]  # fmt: skip
    shards = [_steps(s, 4) for s in samplers]
    assert sorted(i for shard in shards for step in shard for i in step) == list(range(960))
    for p, shard in enumerate(shards):
        for s, rows in enumerate(shard):
            assert rows == samplers[p].local_batch(s, p).tolist()
        request = np.concatenate(shard[:12])  # one request of one process: 48 rows, about 2 chunks
        assert len(np.unique(chunk_of[request])) <= 3


def test_split_steps_cuts_requests_into_steps():
    item = {"a": torch.arange(10), "b": torch.arange(20).reshape(10, 2)}
    steps = list(split_steps([item], 4))
    assert [len(s["a"]) for s in steps] == [4, 4, 2]
    assert torch.equal(steps[1]["b"], item["b"][4:8])


def test_access_auto_chooses_by_size_and_refuses_unknown():
    assert choose_access("auto", 10, budget=100) == "memory"
    assert choose_access("auto", 101, budget=100) == "blocks"
    assert choose_access("random", 10, budget=100) == "random"
    with pytest.raises(ValueError, match="data.access must be one of auto, memory, blocks, random"):
        choose_access("chunks", 10)


def test_every_access_reads_the_same_rows(her2st_encoded):
    datasets = {a: StoreDataset(her2st_encoded, access=a) for a in ("memory", "blocks", "random")}
    assert datasets["memory"]._memory is not None and datasets["random"]._memory is None
    idx = [17, 3, 3, 150, 0]
    batches = {a: d.batch(idx) for a, d in datasets.items()}
    for a in ("blocks", "random"):
        assert batches[a].keys() == batches["memory"].keys() == {"morphology", "ge", "tiles"}
        for k in batches[a]:
            assert torch.equal(batches[a][k], batches["memory"][k])
    assert isinstance(datasets["blocks"].batch_sampler(4, 0), BlockBatchSampler)
    assert type(datasets["memory"].batch_sampler(4, 0)) is StepBatchSampler


def test_training_from_blocks_resumes_exactly(her2st_encoded, tmp_path):
    def run(out, max_steps, resume=True):
        cfg = TrainConfig(output_dir=str(out), max_steps=max_steps, batch_size=4, checkpoint_every=3, seed=5,
                          model={"preset": "tiny", "patch_size": 8},
                          data={"source": "store", "path": str(her2st_encoded), "access": "blocks"})  # fmt: skip
        data = load_training_data(cfg.to_dict()["data"], cfg.to_dict()["model"])
        assert data.train.access == "blocks"
        Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                val=data.val, progress=False, resume=resume).run()  # fmt: skip
        return [line for line in (out / "losses.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    assert run(tmp_path / "b", 6) == straight


def test_the_training_path_reads_the_spots_table_in_columns(her2st_encoded, monkeypatch):
    """A million spots' counts would be read whole by read_h5ad; training needs a few obs columns."""
    from stmdit.data.encode import load_encoders
    from stmdit.data.store import DatasetStore
    from stmdit.model_card import training_record

    encoders = load_encoders(DatasetStore(her2st_encoded))
    whole = DatasetStore(her2st_encoded).spots()

    def refuse(path):
        raise AssertionError(f"{path} was read whole")

    monkeypatch.setattr("stmdit.data.store.read_h5ad", refuse)
    data = StoreDataset(her2st_encoded, access="blocks", encoders=encoders)
    expected = np.flatnonzero(whole.obs["keep"].to_numpy(bool) & (whole.obs["split"] == "train").to_numpy())
    assert data.indices.tolist() == expected.tolist()
    record = training_record({}, data)["data"]
    counts = whole.obs["sample_id"].iloc[expected].astype(str).value_counts()
    assert {s["sample_id"]: s["spots"] for s in record["samples"]} == counts.to_dict()
    assert {s["source_format"] for s in record["samples"]} == {"legacy_st"}

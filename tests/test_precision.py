import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stmdit import STMDiT
from stmdit.data.features import FeatureDataset
from stmdit.diffusion import Condition, guided_prediction, make_sampling_scheduler, sample
from stmdit.precision import (
    cpu_has_bf16,
    current_default,
    default_precision,
    mixed_precision_setting,
    resolve_precision,
)
from stmdit.train import TrainConfig, Trainer


def tiny_model():
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=8, patch_size=2, morph_dim=6, ge_dim=5)
    for p in (
        model.parameters()
    ):  # trained-like weights: the zero-initialised outputs would make any precision agree
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


class LinearDtypes:
    """Records the dtype every nn.Linear of a model computes in, through forward hooks."""

    def __init__(self, model: torch.nn.Module):
        self.seen: list[torch.dtype] = []
        self.handles = [m.register_forward_hook(lambda _m, _i, out: self.seen.append(out.dtype))
                        for m in model.modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip

    def close(self) -> set[torch.dtype]:
        for h in self.handles:
            h.remove()
        return set(self.seen)


def test_resolve_precision_follows_the_hardware_and_rejects_unknown_names(monkeypatch):
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    cpu_has_bf16.cache_clear()
    try:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
        assert resolve_precision("auto", "cpu") == "fp32" and mixed_precision_setting("auto") == "no"
        cpu_has_bf16.cache_clear()
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
        assert resolve_precision("auto", "cpu") == "bf16" and mixed_precision_setting("auto") == "bf16"
    finally:
        cpu_has_bf16.cache_clear()
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16; got 'fp16'"):
        resolve_precision("fp16")


def test_bf16_sampling_runs_the_transformer_in_bf16_and_stays_close_to_fp32():
    model = tiny_model()
    cond = Condition(morphology=torch.randn(4, 6), ge=torch.randn(4, 5))
    out = {}
    for precision in ("fp32", "bf16"):
        hooks = LinearDtypes(model)
        out[precision] = sample(model, make_sampling_scheduler(pixel_space=True), cond, num_inference_steps=5,
                                generator=torch.Generator().manual_seed(0), progress=False, precision=precision)  # fmt: skip
        assert hooks.close() == {torch.float32 if precision == "fp32" else torch.bfloat16}
        assert out[precision].dtype == torch.float32  # the scheduler's state stays fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per product): close, but not identical.
    x, t = torch.randn(4, 3, 8, 8), torch.tensor(500)
    eps = {p: guided_prediction(model, x, t, cond, 2.5, 2.5, p) for p in ("fp32", "bf16")}
    relative = ((eps["bf16"] - eps["fp32"]).norm() / eps["fp32"].norm()).item()
    assert 1e-4 < relative < 0.02
    # Over the sampler's steps the per-step differences add up; on a random model the tiles
    # still differ by a few percent of their magnitude only.
    diff = (out["bf16"] - out["fp32"]).abs()
    assert 0 < diff.mean() < 0.05 * out["fp32"].abs().mean()


def test_bf16_training_computes_in_bf16_keeps_fp32_master_weights_and_learns(tmp_path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    data = FeatureDataset(
        latents=x0, morphology=torch.randn(8, 6, generator=g), ge=torch.randn(8, 5, generator=g)
    )
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), model={"preset": "tiny", "patch_size": 2}, max_steps=80,
                      batch_size=8, learning_rate=2e-3, warmup_steps=5, checkpoint_every=80,
                      mixed_precision="bf16", ema_decay=0.9)  # fmt: skip
    seen: set[torch.dtype] = set()
    original = torch.nn.Linear.forward

    def recording_forward(self, x):
        out = original(self, x)
        seen.add(out.dtype)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Linear, "forward", recording_forward)
        result = Trainer(cfg, data, progress=False).run()
    assert seen == {torch.bfloat16}
    losses = [
        r["loss"] for r in map(json.loads, (Path(cfg.output_dir) / "losses.jsonl").read_text().splitlines())
    ]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    from safetensors.torch import load_file

    ckpt = result.run_dir / "checkpoints" / "step_00000080"
    weights = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = load_file(ckpt / "ema.safetensors")
    assert {t.dtype for t in [*weights.values(), *ema.values()]} == {torch.float32}


def test_default_precision_applies_inside_its_block_only():
    assert current_default() == "fp32"  # library calls are exact unless a command asks otherwise
    with default_precision("bf16"):
        assert current_default() == "bf16"
        with pytest.raises(ValueError, match="precision must be one of"), default_precision("half"):
            pass
        assert current_default() == "bf16"
    assert current_default() == "fp32"

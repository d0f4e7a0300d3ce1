"""The LLM-quantization <-> diffusion bridge of bench/hex_quant.py on the bundled tiny masked-diffusion model."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from outlierkit.diffusion.hex import HexConfig, decode_paths
from outlierkit.diffusion.tiny import TINY_TOKENS, decode, load_tiny
from outlierkit.llm.layers import QuantLinear
from outlierkit.llm.methods.base import QuantContext
from outlierkit.llm.methods.os_plus import OSPlus
from outlierkit.llm.methods.smoothquant import SmoothQuant
from outlierkit.llm.models import resolve

BENCH = Path(__file__).resolve().parents[1] / "bench" / "hex_quant.py"


@pytest.fixture(scope="module")
def hq() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_hex_quant", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    mdm, task, _ = load_tiny()
    return mdm, task


def _logits(model: torch.nn.Module, batches: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b.input_ids) for b in batches])


def test_table_entry_places_every_site(hq: ModuleType, tiny: tuple) -> None:
    mdm, task = tiny
    view = hq.TinyHFView(mdm)
    mm = resolve(view)
    assert mm.spec.name == "tiny-mdm" and not mm.generic
    assert len(mm.linears) == 4 * mdm.config.n_layers  # qkv, proj, ff.0, ff.2 per block
    groups = mm.fold_groups(view)
    assert sorted({g.kind for _, g in groups}) == ["attn_v", "norm"] and len(groups) == 3 * mdm.config.n_layers

    prof = hq.profile_tiny(view, hq.denoiser_batches(task, 12, 4, seed=0))
    for i in range(mdm.config.n_layers):
        for kind in ("residual", "attn", "mlp", "down_in", "linear_in"):
            sites = [s for s in prof.sites if s.layer == i and s.kind == kind]
            assert sites, (i, kind)
            assert all(prof.stats[s.name].count > 0 and prof.stats[s.name].absmax > 0 for s in sites), (i, kind)
    rows = hq.profile_rows(prof)
    assert {r["kind"] for r in rows} >= {"embedding", "final_norm", "residual", "linear_in"}


@pytest.mark.parametrize("method", [SmoothQuant(alpha=0.5, folds=("norm", "attn_v")),
                                    OSPlus(search="coarse", max_candidates=50)], ids=["smoothquant", "os_plus"])
def test_float_transforms_keep_logits(hq: ModuleType, tiny: tuple, method: object) -> None:
    mdm, task = tiny
    batches = hq.denoiser_batches(task, 16, 8, seed=3)
    view = hq.TinyHFView(copy.deepcopy(mdm))
    before = _logits(view, batches)
    w_before = view.mdm.blocks[1].qkv.weight.detach().clone()
    records = method.apply(view, QuantContext(batches))  # type: ignore[attr-defined]
    assert len(records) == 3 * mdm.config.n_layers  # every norm -> qkv / norm -> ff.0 / v -> proj group
    assert not torch.allclose(view.mdm.blocks[1].qkv.weight, w_before)  # it did move scales
    after = _logits(view, batches)
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)


def test_w8a8_rtn_tiny_still_decodes(hq: ModuleType, tiny: tuple) -> None:
    mdm, task = tiny
    calib = hq.denoiser_batches(task, 32, 16, seed=0)
    qmodel, rep = hq.quantized_copy(mdm, "rtn", "w8a8", calib, calib)
    wrapped = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert len(wrapped) == 4 * mdm.config.n_layers and not any(q.is_float for q in wrapped)
    assert not any(isinstance(m, QuantLinear) for m in mdm.modules())  # the float model is untouched
    assert rep.metrics["output_sqnr_db"] > 25  # measured ~38 dB at W8A8 static per-tensor activations

    problems = task.heldout(24)
    cfg = HexConfig(schedules=("4", "16"), seeds_per_block=1, temperature=0.0, gen_length=task.gen_length,
                    steps=4, extractor="after_hash", batch_rows=64)
    prompts = [list(p.prompt_ids) for p in problems]
    ref = decode_paths(mdm, prompts, TINY_TOKENS, cfg, decode, max_context=mdm.config.max_len)
    got = decode_paths(qmodel, prompts, TINY_TOKENS, cfg, decode, max_context=mdm.config.max_len)
    assert all(p.answer is not None for p in got)
    same = sum(a.answer == b.answer for a, b in zip(ref, got, strict=True)) / len(ref)
    assert same >= 0.8, same


def test_bad_format_is_one_line_error(hq: ModuleType) -> None:
    from outlierkit.errors import ConfigError

    with pytest.raises(ConfigError, match="w8a8"):
        hq.recipe_for("rtn", "int8")

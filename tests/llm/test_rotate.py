"""Rotations: Hadamard constructions, exact folds (fp64) on every supported family, refusals, composition."""

from __future__ import annotations

import math
import types

import pytest
import torch

from outlierkit.errors import ConfigError
from outlierkit.llm.calibrate import collect_input_stats
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import parse_format
from outlierkit.llm.hadamard import OnlineQuantLinear, hadamard, random_orthogonal, rotation
from outlierkit.llm.methods import METHODS, QuantContext
from outlierkit.llm.methods.rotate import REFUSED, SUPPORTED
from outlierkit.llm.recipe import quantize_


@pytest.fixture(scope="module")
def batches(tok):
    from outlierkit.llm.corpus import build_corpus, load_documents

    return build_corpus(tok, load_documents(None), samples=6, seq_len=24, seed=3).batches(3)


# ------------------------------------------------------------------------------ matrices

@pytest.mark.parametrize("n, label", [(64, "sylvester-64"), (12, "sylvester-1 x paley-12"),
                                      (20, "sylvester-1 x paley-20"), (1536, "sylvester-128 x paley-12"),
                                      (88, "sylvester-2 x paley-44"), (172, "block-diagonal 43 x sylvester-4")])
def test_hadamard_constructions_are_orthogonal(n, label):
    h, got = hadamard(n)
    assert got.startswith(label)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    if "block" not in got:  # a true Hadamard matrix: entries +-1/sqrt(n)
        assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))


def test_sylvester_is_scipys_and_odd_orders_refused():
    from scipy.linalg import hadamard as sylvester

    assert torch.equal(hadamard(32)[0] * math.sqrt(32), torch.from_numpy(sylvester(32).astype("float64")))
    with pytest.raises(ConfigError, match="odd order 7"):
        hadamard(7)
    q = random_orthogonal(48, seed=1)
    assert torch.allclose(q.t() @ q, torch.eye(48, dtype=torch.float64), atol=1e-12)
    r, label = rotation(64, "hadamard", seed=2)
    assert label.startswith("randomized") and torch.allclose(r @ r.t(), torch.eye(64, dtype=torch.float64))


# ------------------------------------------------------------------------------ exactness

def _exact_norms(model: torch.nn.Module) -> None:
    """transformers' RMSNorms compute in float32 even in a float64 model; for an fp64-precision check of the
    fold algebra, evaluate the same formula in the model's dtype."""
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNorm"):
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
            offset = name.startswith("Gemma")

            def fwd(self, x, eps=eps, offset=offset):
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                return y * ((1 + self.weight) if offset else self.weight)

            m.forward = types.MethodType(fwd, m)


@torch.no_grad()
def _logits(model, batches) -> list[torch.Tensor]:
    return [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double() for b in batches]


def _relerr(a, b) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True))
    return (num / sum(float(y.pow(2).sum()) for y in b)) ** 0.5


MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}
CORE = ("llama", "gemma", "phi3", "qwen2_moe")
SUPPORTED_FIXTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe",
                      "olmoe"]


@pytest.mark.parametrize("family", [f if f in CORE else pytest.param(f, marks=pytest.mark.slow)
                                    for f in SUPPORTED_FIXTURES])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_keeps_the_float_model(family, kind, batches):
    """fp64 to 1e-12 (MoE in fp32: torch's grouped expert matmul has no float64 kernel)."""
    model = tiny_model(family)
    if family not in MOE:
        model = model.double()
        _exact_norms(model)
    ref = _logits(model, batches)
    ctx = QuantContext(batches)
    recs = METHODS.get("rotate")(kind=kind, online_down=kind == "hadamard").apply(model, ctx)
    assert recs[0].info["site"] == "residual"
    if family not in MOE and kind == "hadamard":
        assert any(isinstance(m, OnlineQuantLinear) and m.rotation is not None for m in model.modules())
    assert _relerr(_logits(model, batches), ref) < (1e-5 if family in MOE else 1e-12)
    if family == "gemma":  # tied embeddings: untied, as the final norm moves into the LM head
        assert recs[0].info["untied_embeddings"]
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_every_fixture_family_is_supported_or_refused():
    from outlierkit.llm.fixtures import FAMILIES
    from outlierkit.llm.models import ARCHITECTURES

    assert {a.name for a in ARCHITECTURES} == SUPPORTED | set(REFUSED)
    assert set(SUPPORTED_FIXTURES) | {"gemma2", "gemma3_text", "olmo", "olmo2", "opt", "bloom", "gpt2",
                                      "bert"} == set(FAMILIES)


@pytest.mark.parametrize("family", ["gpt2", "bert", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_inexact_families_refused_unchanged(family, batches):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = QuantContext(batches)
    recs = METHODS.get("rotate")().apply(model, ctx)
    assert recs[0].info["applied"] is False and "refused" in ctx.notes[0] and "nothing was rotated" in ctx.notes[0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rotation_spreads_the_outlier_channels(batches):
    """Planted outlier channels (norm weight x25) dominate the q_proj input; after the rotation its
    max|x| / rms falls: the energy is spread over all channels."""
    site = "model.layers.1.self_attn.q_proj"

    def peak_ratio(model) -> float:
        st = collect_input_stats(model, [site], batches, cache={site})[site]
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in st.cached])
        return float(x.abs().max() / x.pow(2).mean().sqrt())

    model = tiny_model("llama")
    before = peak_ratio(model)
    METHODS.get("rotate")().apply(model, QuantContext(batches))
    assert peak_ratio(model) < before / 2


def test_rotate_then_rtn_beats_rtn_at_w4a4(batches):
    out = {}
    for name, steps in {"rtn": [{"rtn": {}}], "rotate": [{"rotate": {"online_down": True}}, {"rtn": {}}]}.items():
        rep = quantize_(tiny_model("llama"), {"weight": "int4-channel", "act": "int4-token", "steps": steps,
                                              "calib": {"min_tokens": 64}}, batches, baseline=False)
        out[name] = rep.metrics["output_sqnr_db"]
    assert out["rotate"] > out["rtn"] + 0.5, out


def test_rotate_order_and_repeat_refused(batches):
    model = tiny_model("llama")
    METHODS.get("rotate")(online_down=True).apply(model, QuantContext(batches))
    with pytest.raises(ConfigError, match="already applied"):
        METHODS.get("rotate")().apply(model, QuantContext(batches))
    model = tiny_model("llama")
    METHODS.get("rtn")().apply(model, QuantContext(batches, parse_format("int8-channel")))
    with pytest.raises(ConfigError, match="before rtn"):
        METHODS.get("rotate")().apply(model, QuantContext(batches))
    with pytest.raises(ConfigError, match="hadamard or random"):
        METHODS.get("rotate")(kind="givens")


def test_online_layer_quantizes_the_rotated_input(batches):
    """rotate + rtn: the down projection's activation quantizer sees h H, and its SQNR is recorded."""
    model = tiny_model("llama")
    rep = quantize_(model, {"weight": "int8-channel", "act": "int8-token", "calib": {"min_tokens": 64},
                            "steps": [{"rotate": {"online_down": True}}, {"rtn": {}}]}, batches, baseline=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, OnlineQuantLinear) and down.act_format is not None
    rows = {r["layer"]: r for r in rep.tables["layer_sqnr"]}
    assert math.isfinite(rows["model.layers.0.mlp.down_proj"]["sqnr_db"])
    assert any("online" in str(r.get("serving", "")) for r in rep.tables["transforms"])


@pytest.mark.parametrize("method, params", [("smoothquant", {"folds": ("norm", "attn_v", "linear")}),
                                            ("os_plus", {"batches": 1, "max_candidates": 20})])
def test_fold_into_an_online_rotation_refused(method, params, batches):
    """Regression: smoothquant/os_plus after rotate scaled the down projection's columns in the rotated basis
    (float model off by 180%); the up -> down fold is now refused, and the other order stays exact."""
    model = tiny_model("llama")
    METHODS.get("rotate")(online_down=True).apply(model, QuantContext(batches))
    ctx = QuantContext(batches, parse_format("int8-channel"), parse_format("int8-tensor"))
    with pytest.raises(ConfigError, match="online rotation.*before rotate"):
        METHODS.get(method)(**params).apply(model, ctx)
    model = tiny_model("llama").double()
    _exact_norms(model)
    ref = _logits(model, batches)
    METHODS.get(method)(**params).apply(model, ctx)
    METHODS.get("rotate")(online_down=True).apply(model, QuantContext(batches))
    assert _relerr(_logits(model, batches), ref) < 1e-10


def test_saving_an_online_rotation_refused(batches, tok, tmp_path):
    """Regression: save_quantized unwrapped the online-rotation layer and wrote W H without H (a different
    model on reload, silently); now it refuses and writes nothing."""
    from outlierkit.llm.export import save_quantized

    model = tiny_model("llama")
    METHODS.get("rotate")(online_down=True).apply(model, QuantContext(batches))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj has an online rotation"):
        save_quantized(model, tok, tmp_path / "q")
    assert not (tmp_path / "q").exists()

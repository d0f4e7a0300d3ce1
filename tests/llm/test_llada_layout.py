"""The remote-code LLaDA layout (model.transformer.blocks, OLMo-style names) resolves, profiles and folds."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from outlierkit.llm.models import resolve
from outlierkit.llm.profile import ProfileOptions, profile_model


class _Block(nn.Module):
    """A LLaDALlamaBlock-shaped block: bidirectional attention, SwiGLU MLP, RMSNorms."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ff_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), \
            nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.ff_out = nn.Linear(2 * d, d, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, D)

        bias = mask[:, None, None, :].bool()  # keys that are real tokens
        att = F.scaled_dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)),
                                             attn_mask=bias)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        h = self.ff_norm(x)
        return x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(30522, 32), "blocks": nn.ModuleList([_Block(), _Block()]),
                                          "ln_f": nn.RMSNorm(32)})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.transformer["wte"](input_ids)
        for blk in self.transformer["blocks"]:
            x = blk(x, mask)
        return self.transformer["ln_f"](x)


class _LLaDA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "llada"})()
        self.model = _Backbone()
        with torch.no_grad():  # planted outlier channel in the norm feeding q/k/v
            for blk in self.model.transformer["blocks"]:
                blk.attn_norm.weight[3] = 30.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


def test_remote_code_llada_layout(corpus):
    torch.manual_seed(0)
    model = _LLaDA().eval()
    mm = resolve(model)
    assert mm.spec.name == "llada" and not mm.generic and mm.layers[0] == "model.transformer.blocks.0"
    assert len(mm.fold_groups(model)) == 8
    prof = profile_model(model, mm, corpus.subset(range(4)), ProfileOptions(batch_size=2, calib_fraction=0.5))
    kinds = {s.kind for s in prof.sites}
    assert {"embedding", "residual", "attn", "mlp", "gate", "down_in", "final_norm"} <= kinds
    assert all(st.count > 0 for st in prof.stats.values())
    # SmoothQuant's norm -> q,k,v fold is exact on this layout too
    from outlierkit.llm.methods import METHODS
    from outlierkit.llm.methods.base import QuantContext

    batch = corpus.subset(range(4)).batches(4)[0]
    with torch.no_grad():
        ref = model(batch.input_ids, batch.attention_mask)
        METHODS.get("smoothquant")().apply(model, QuantContext(batches=[batch], map=mm))
        out = model(batch.input_ids, batch.attention_mask)
        assert float(model.model.transformer["blocks"][0].attn_norm.weight[3]) < 30.0  # the outlier moved
    m = batch.attention_mask.bool()
    torch.testing.assert_close(out[m], ref[m], rtol=1e-4, atol=1e-4)

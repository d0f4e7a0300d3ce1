"""The profiler at scale, on CPU: host reads per batch (counted), temporary memory per hook (tracked), and
device maps (every hook indexes on its own activation's device)."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from outlierkit.llm import profile as prof_mod
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.models import resolve
from outlierkit.llm.profile import ProfileOptions, profile_model

# Calls that wait for the device and copy a value to the host (on a GPU each one stalls the stream).
_READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero",
          "argwhere", "unique", "unique_consecutive", "bincount", "masked_select", "repeat_interleave"}


class HostReads(TorchFunctionMode):
    """Counts device-to-host reads: the calls above, plus indexing with a boolean or 0-d tensor (both read
    the index on the host). ``repeat_interleave`` counts only with tensor repeats (an int needs no read)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False
        self.where: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self.paused:
            hit = name in _READS
            if name == "repeat_interleave":
                rep = args[1] if len(args) > 1 else kwargs.get("repeats")
                hit = isinstance(rep, torch.Tensor)
            if name in ("__getitem__", "__setitem__"):
                idx = args[1] if len(args) > 1 else None
                idx = idx if isinstance(idx, tuple) else (idx,)
                hit = any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or i.dim() == 0) for i in idx)
            if hit:
                self.count += 1
                self.where.append(name)
        return func(*args, **kwargs)


def _count_reads(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, corpus: Any,
                 opts: ProfileOptions) -> tuple[int, int]:
    """(host reads, batches) of one ``profile_model`` run, and the reads of a bare forward over the same
    batches (the model's own, e.g. transformers' mask checks) subtracted. Host work on host data is not
    counted: building each batch's index from its host attention mask, hashing the corpus's token lists."""
    from outlierkit.llm.corpus import TokenCorpus

    counter = HostReads()

    def paused(real: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            counter.paused = True
            try:
                return real(*a, **k)
            finally:
                counter.paused = False
        return call

    monkeypatch.setattr(prof_mod.BatchIndex, "__init__", paused(prof_mod.BatchIndex.__init__))
    monkeypatch.setattr(TokenCorpus, "fingerprint", paused(TokenCorpus.fingerprint))
    with counter:
        prof = profile_model(model, resolve(model), corpus, opts)
    monkeypatch.undo()
    bare = HostReads()
    runner = prof_mod._base_model(model, resolve(model))
    batches = corpus.batches(opts.batch_size)
    with bare, torch.no_grad():
        for b in batches:
            runner(input_ids=b.input_ids, attention_mask=b.attention_mask)
    per_forward = bare.count / len(batches)
    return counter.count - round(per_forward * prof.batches_done), prof.batches_done


@pytest.mark.parametrize("level", ["basic", "default", "full"])
def test_no_host_reads_per_batch_whatever_the_model_size(level, corpus, monkeypatch):
    # regression: 37-39 reads per hook (float(), int(), .cpu(), nonzero, bincount, unique ...), i.e. about
    # 800 per batch on MiniLM; now reads happen only when statistics are flushed (calibration, end of run)
    per_batch = {}
    for layers in (2, 4):
        model = tiny_model("llama", num_hidden_layers=layers)
        (r1, b1), (r2, b2) = (_count_reads(monkeypatch, model, corpus.subset(range(n)),
                                           ProfileOptions(level=level, batch_size=2, calib_fraction=0.4))
                              for n in (4, 8))
        assert b2 > b1
        per_batch[layers] = (r2 - r1) / (b2 - b1)
    assert max(per_batch.values()) <= 4, per_batch  # the target
    assert per_batch[2] == per_batch[4] == 0, per_batch  # and in fact none, at any model size


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors allocated (and still alive) while active: what a hook adds to memory."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        n = t.untyped_storage().nbytes()
        if n == 0:
            return
        self.live += n
        self.peak = max(self.peak, self.live)

        def free() -> None:
            self.live -= n

        weakref.finalize(t, free)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        fresh = not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
        if fresh:  # a new allocation (views and in-place ops allocate nothing)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out


def _collector_for(x: torch.Tensor, mask: torch.Tensor, thresholds: bool, stride: int = 8):
    from outlierkit.llm.corpus import Batch
    from outlierkit.llm.profile import Collector, Site

    model = tiny_model("llama")
    site = Site("s", "residual", 0, "model.norm")
    col = Collector(model, resolve(model), [site], hist_stride=stride)
    if thresholds:
        col.thresholds = {"s": {"absmax": 3.0, "p99.9": 2.0}}
    b, t = mask.shape
    col.begin_batch(Batch(torch.ones(b, t, dtype=torch.long), mask.long(), list(range(b))))
    return col, site


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("stride", [1, 8])
@pytest.mark.parametrize("shape", [(2, 1024, 1024), (1, 512, 4096)])
def test_temporary_memory_per_hook_within_one_activation(dtype, stride, shape):
    # regression: every hook copied the activation to fp32 (and fp64), plus the valid rows: ~3x at the
    # default level, 8x at the exact level, 8x more for the INT8 check
    torch.manual_seed(0)
    b, t, c = shape
    x = torch.randn(b, t, c).to(dtype)  # (B, T, C)
    x[0, 5, 7] = 2e4
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, int(t * 0.7):] = False  # padded: the valid rows are gathered chunk by chunk
    col, site = _collector_for(x, mask, thresholds=True, stride=stride)
    col._record(site, x)  # warm-up: lazily built index chunks and accumulators are not temporaries
    with LiveBytes() as mem:
        col._record(site, x)
    assert mem.peak <= x.numel() * x.element_size(), mem.peak / (x.numel() * x.element_size())
    col.end_batch()
    col.flush()
    st = col.stats["s"]
    assert st.tokens == 2 * int(mask.sum()) and st.absmax  # two calls == pytest.approx(2e4, rel=1e-2)
    assert col.int8["s"]["absmax"].count == st.dcount  # the INT8 errors use the distribution subsample


def _same_statistics(a, b) -> None:
    assert a.massive_tokens == b.massive_tokens and a.tokens == b.tokens
    for name, st in a.stats.items():
        o = b.stats[name]
        assert (o.count, o.vmax, o.vmin, o.loc_max, o.loc_min, o.massive_tokens) == \
            (st.count, st.vmax, st.vmin, st.loc_max, st.loc_min, st.massive_tokens), name
        assert o.s2 == pytest.approx(st.s2, rel=1e-9) and o.d4 == pytest.approx(st.d4, rel=1e-9)
        torch.testing.assert_close(o.hist, st.hist, rtol=0, atol=0)
        torch.testing.assert_close(o.ch_max, st.ch_max.to(o.ch_max.device), rtol=0, atol=0)
        torch.testing.assert_close(o.top_vals, st.top_vals.to(o.top_vals.device))
    for name, checks in a.int8.items():
        for kind, chk in checks.items():
            assert b.int8[name][kind].threshold == chk.threshold
            assert b.int8[name][kind].sqnr_db == pytest.approx(chk.sqnr_db, rel=1e-9)


def test_split_model_indexes_on_each_sites_device(corpus, monkeypatch):
    """Device maps (regression: the valid-token index lived on the first parameter's device, so a hook on
    a second device indexed across devices). On CPU a second device is a second device *key*: layers >= 1
    and the final norm report ``cpu:1``; every hook must then use the batch index's copy for its own key,
    and the statistics must be those of the unsplit model."""
    from outlierkit.llm.profile import BatchIndex, Collector
    from outlierkit.llm.stats import SiteAccumulator

    model = tiny_model("llama")
    mm = resolve(model)
    opts = ProfileOptions(batch_size=3, calib_fraction=0.4)
    whole = profile_model(model, mm, corpus, opts)
    first, second = torch.device("cpu"), torch.device("cpu", 1)
    indexes: list[BatchIndex] = []  # kept alive: storages are not reused, so pointers identify copies
    used: list[tuple[torch.device, int]] = []
    real_init, real_update = BatchIndex.__init__, SiteAccumulator.update

    def init(self: Any, *a: Any, **k: Any) -> None:
        real_init(self, *a, **k)
        indexes.append(self)

    def update(self: Any, x: torch.Tensor, chunk: Any, **k: Any) -> None:
        used.append((self.device, chunk.info.untyped_storage().data_ptr()))
        real_update(self, x, chunk, **k)

    monkeypatch.setattr(BatchIndex, "__init__", init)
    monkeypatch.setattr(SiteAccumulator, "update", update)
    monkeypatch.setattr(Collector, "device_of", lambda self, site, x: second if site.layer >= 1 or
                        site.kind == "final_norm" else first)
    split = profile_model(model, mm, corpus, opts)
    monkeypatch.undo()
    copies = {dev: {i._on[dev]["info"].untyped_storage().data_ptr() for i in indexes} for dev in (first, second)}
    assert all(set(i._on) == {first, second} for i in indexes)
    assert not copies[first] & copies[second]  # one copy per device key
    assert {d for d, _ in used} == {first, second}
    assert all(ptr in copies[dev] for dev, ptr in used)  # every update indexed with its own device's copy
    _same_statistics(whole, split)


def _move_inputs(device: torch.device):
    def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        def mv(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, tuple):
                return tuple(mv(t) for t in v)
            return v
        return tuple(mv(a) for a in args), {k: mv(v) for k, v in kwargs.items()}
    return hook


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a real split over cpu and cuda")
def test_real_split_over_cpu_and_cuda(corpus):
    from outlierkit.llm.models import get_attr

    model = tiny_model("llama")
    mm = resolve(model)
    opts = ProfileOptions(batch_size=3, calib_fraction=0.4)
    whole = profile_model(model, mm, corpus, opts)
    cuda = torch.device("cuda")
    handles = []
    for fqn in [*mm.layers[1:], mm.final_norm]:
        mod = get_attr(model, fqn)
        mod.to(cuda)
        handles.append(mod.register_forward_pre_hook(_move_inputs(cuda), with_kwargs=True))
    try:
        split = profile_model(model, mm, corpus, opts)
    finally:
        for h in handles:
            h.remove()
    assert split.global_max() is not None
    for name, st in whole.stats.items():
        o = split.stats[name]
        assert o.count == st.count and o.vmax == pytest.approx(st.vmax, rel=1e-5) and o.loc_max == st.loc_max


def test_fused_moe_experts_have_no_host_reads_per_batch(corpus, monkeypatch):
    # the per-expert routing statistics (token counts, input absmax) accumulate on the device too; only
    # ``full`` level, which recomputes the routed experts, reads which experts got tokens (per MoE layer)
    model = tiny_model("mixtral")
    (r1, b1), (r2, b2) = (_count_reads(monkeypatch, model, corpus.subset(range(n)),
                                       ProfileOptions(level="default", batch_size=2, calib_fraction=0.4))
                          for n in (4, 8))
    assert b2 > b1 and r2 == r1


@pytest.mark.parametrize("family", ["llama", "mixtral", "bert"])
def test_layerwise_profile_equals_plain(corpus, family):
    """`profile --sequential` (the model runs layer by layer in groups of batches, layer-major; the embeddings
    run once per batch at capture and their hooks are off when the head re-runs them) gives the statistics of
    the plain run, at the full level (embeddings, every site, final norm) with the INT8 check."""
    from outlierkit.llm.sequential import layerwise

    model = tiny_model(family)
    mm = resolve(model)
    opts = ProfileOptions(level="full", batch_size=2, calib_fraction=0.4, layerwise_batches=2)
    whole = profile_model(model, mm, corpus, opts)
    with layerwise(model, "cpu"):
        seq = profile_model(model, mm, corpus, opts)
    assert seq.batches_done == whole.batches_done and seq.thresholds == whole.thresholds
    assert {s.kind for s in whole.sites} >= {"embedding", "linear_in"}
    _same_statistics(whole, seq)

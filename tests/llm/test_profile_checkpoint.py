"""Profile checkpoints: one self-validating file, torn or altered checkpoints refused, resume only with the
same inputs, INT8 thresholds kept across a resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from outlierkit.errors import DataError
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.models import get_attr, resolve
from outlierkit.llm.profile import ActivationProfile, ProfileOptions, profile_model

OPTS = ProfileOptions(batch_size=2, checkpoint_every=1, calib_fraction=0.4)


def _interrupted(model, corpus, ckpt, after: int, opts: ProfileOptions = OPTS) -> None:
    """Profile until ``after`` batches are done, then die like a killed process."""
    mm = resolve(model)
    calls = {"n": 0}

    def crash(m, a, o):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise KeyboardInterrupt

    handle = get_attr(model, mm.layers[-1]).register_forward_hook(crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            profile_model(model, mm, corpus, opts, checkpoint=ckpt)
    finally:
        handle.remove()


def _assert_same(full: ActivationProfile, resumed: ActivationProfile) -> None:
    assert resumed.batches_done == full.batches_done and resumed.tokens == full.tokens
    assert resumed.thresholds == full.thresholds and resumed.massive_tokens == full.massive_tokens
    for name, st in full.stats.items():
        o = resumed.stats[name]
        assert (o.count, o.vmax, o.vmin, o.loc_max) == (st.count, st.vmax, st.vmin, st.loc_max)
        assert o.s2 == pytest.approx(st.s2, rel=1e-12)
        torch.testing.assert_close(o.hist, st.hist, rtol=0, atol=0)
        torch.testing.assert_close(o.top_vals, st.top_vals, rtol=0, atol=0)
    for name, checks in full.int8.items():
        for kind, chk in checks.items():
            assert resumed.int8[name][kind].threshold == chk.threshold
            assert resumed.int8[name][kind].count == chk.count
            assert resumed.int8[name][kind].se2 == pytest.approx(chk.se2, rel=1e-12)


def test_checkpoint_is_one_self_validating_file(corpus, tmp_path):
    model = tiny_model("llama")
    ckpt = tmp_path / "ckpt"
    _interrupted(model, corpus, ckpt, after=3)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ckpt.json", "ckpt.safetensors"]  # the statistics file + a manifest, no temp files left
    loaded = ActivationProfile.load(ckpt)
    assert loaded.batches_done == 3
    manifest = json.loads((tmp_path / "ckpt.json").read_text())
    assert manifest["batches_done"] == 3 and len(manifest["sha256_file"]) == 64
    # loading needs only the statistics file
    (tmp_path / "ckpt.json").unlink()
    assert ActivationProfile.load(ckpt).batches_done == 3


def test_torn_pair_is_never_double_counted(corpus, tmp_path):
    # regression: checkpoints were two files written one after the other; a kill between them left a pair
    # that --resume accepted and then double-counted a batch (quantiles, top-k, INT8 thresholds off)
    model = tiny_model("llama")
    mm = resolve(model)
    full = profile_model(model, mm, corpus, OPTS)
    ckpt = tmp_path / "ckpt"
    _interrupted(model, corpus, ckpt, after=2)
    stale = (tmp_path / "ckpt.json").read_text()
    _interrupted(model, corpus, ckpt, after=4)
    (tmp_path / "ckpt.json").write_text(stale)  # killed after the statistics, before the manifest
    resumed = profile_model(model, mm, corpus, OPTS, checkpoint=ckpt, resume=True)
    _assert_same(full, resumed)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "old_format", "empty"])
def test_damaged_checkpoint_is_refused(damage, corpus, tmp_path):
    model = tiny_model("llama")
    ckpt = tmp_path / "ckpt"
    _interrupted(model, corpus, ckpt, after=2)
    path = tmp_path / "ckpt.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[: len(data) - 1000]))
    elif damage == "flipped":
        data[-7] ^= 0x40  # one bit of one histogram count
        path.write_bytes(bytes(data))
    elif damage == "old_format":
        from safetensors.torch import save

        path.write_bytes(save({"stats/x/hist": torch.zeros(3)}))
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError, match="ckpt.safetensors"):
        profile_model(model, resolve(model), corpus, OPTS, checkpoint=ckpt, resume=True)


@pytest.mark.parametrize("change", ["samples", "seq_len", "level", "batch_size", "massive_ratio", "model"])
def test_resume_with_other_inputs_is_refused(change, corpus, tmp_path):
    # regression: a resume with another --samples, --seq-len or --data was accepted and mixed corpora
    model = tiny_model("llama")
    ckpt = tmp_path / "ckpt"
    _interrupted(model, corpus, ckpt, after=2)
    opts, data, other = OPTS, corpus, model
    if change == "samples":
        data = corpus.subset(range(len(corpus) - 1))
    elif change == "seq_len":
        from outlierkit.llm.corpus import TokenCorpus

        data = TokenCorpus([s[:20] for s in corpus.samples], corpus.sources, 20, corpus.pad_id)
    elif change == "model":
        other = tiny_model("llama", num_hidden_layers=3)
    else:
        value = {"level": "basic", "batch_size": 3, "massive_ratio": 10.0}[change]
        opts = ProfileOptions(**{**OPTS.__dict__, change: value})
    with pytest.raises(DataError, match="other inputs"):
        profile_model(other, resolve(other), data, opts, checkpoint=ckpt, resume=True)
    shutil.rmtree(tmp_path)


def test_resume_after_calibration_keeps_the_thresholds(corpus, tmp_path):
    # regression: a resume past the calibration split recalibrated the INT8 thresholds on statistics that
    # already held evaluation batches
    model = tiny_model("llama")
    mm = resolve(model)
    full = profile_model(model, mm, corpus, OPTS)
    n_cal_batches = 2  # 4 calibration samples in batches of 2
    ckpt = tmp_path / "ckpt"
    _interrupted(model, corpus, ckpt, after=n_cal_batches + 1)
    assert ActivationProfile.load(ckpt).thresholds == full.thresholds
    resumed = profile_model(model, mm, corpus, OPTS, checkpoint=ckpt, resume=True)
    _assert_same(full, resumed)


def test_checkpoint_path_per_rank():
    from pathlib import Path

    from outlierkit.llm.profile import checkpoint_path

    assert checkpoint_path(Path("d/ckpt"), (0, 1)) == Path("d/ckpt")
    assert checkpoint_path(Path("d/ckpt"), (1, 2)) == Path("d/ckpt-rank1of2")
    # a name that already names its rank (the CLI's checkpoint-K-rankR-ofW) is used as given
    assert checkpoint_path(Path("d/checkpoint-0-rank1-of2"), (1, 2)) == Path("d/checkpoint-0-rank1-of2")
    assert checkpoint_path(Path("d/checkpoint-0-rank1-of12"), (10, 12)) == Path("d/checkpoint-0-rank1-of12-rank10of12")

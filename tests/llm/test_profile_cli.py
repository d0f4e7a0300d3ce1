"""Profiler CLI, model loading, corpus handling, distributed merge and the real MiniLM."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from outlierkit.cli import main
from outlierkit.errors import DataError, ModelLoadError
from outlierkit.llm.corpus import build_corpus, load_documents
from outlierkit.llm.models import load_model, resolve


def test_profile_cli_writes_report_and_plots(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["profile", str(tiny_llama_dir), "--samples", "6", "--seq-len", "32", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "report.json").read_text())
    assert data["kind"] == "llm.profile" and data["config"]["samples"] == 6
    assert data["metrics"]["where"].startswith("layer_") and abs(data["metrics"]["global_max"]) > 1
    assert {"summary", "sites", "top_values", "channels", "massive_tokens", "int8"} <= set(data["tables"])
    for png in ("layerwise_max.png", "top_channels.png", "sqnr_vs_max.png"):
        assert (out / png).stat().st_size > 1000
    assert "global max" in capsys.readouterr().out
    assert not (tmp_path / "run.partial").exists()
    # an existing output needs --force; nothing is touched
    before = (out / "report.json").read_bytes()
    assert main(["profile", str(tiny_llama_dir), "--samples", "6", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before


def test_profile_cli_compares_several_models(tiny_llama_dir, tmp_path):
    from outlierkit.llm.fixtures import save_tiny

    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    out = tmp_path / "cmp"
    assert main(["profile", str(tiny_llama_dir), str(gpt2), "--samples", "4", "--seq-len", "24",
                 "--level", "basic", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    names = [tiny_llama_dir.name, "gpt2"]
    assert [r["model"] for r in data["tables"]["summary"]] == names
    assert all(f"{n}.global_max" in data["metrics"] for n in names)


def test_profile_cli_resume_after_interrupt(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import outlierkit.llm.profile as prof_mod

    out = tmp_path / "res"
    args = ["profile", str(tiny_llama_dir), "--samples", "8", "--seq-len", "24", "--batch-size", "2",
            "--checkpoint-every", "1", "--out", str(out)]
    real = prof_mod.Collector.begin_batch
    calls = {"n": 0}

    def flaky(self, batch, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, batch, device)

    monkeypatch.setattr(prof_mod.Collector, "begin_batch", flaky)
    assert main(args) == 130
    assert not out.exists() and (tmp_path / "res.partial" / "checkpoint-0.json").exists()
    monkeypatch.setattr(prof_mod.Collector, "begin_batch", real)
    capsys.readouterr()
    # regression: a resume with other inputs was accepted and mixed two corpora; refused, checkpoints kept
    data = tmp_path / "other.txt"
    data.write_text("Some other text about activation outliers in transformers. " * 40)
    for other in (["--samples", "10"], ["--seq-len", "20"], ["--seed", "1"], ["--data", str(data)]):
        changed = [*args[:-2], *other, "--out", str(out), "--resume"]
        assert main(changed) == 2
        err = capsys.readouterr().err
        assert "--resume with other inputs" in err and other[0] in err and len(err.strip().splitlines()) == 1
        assert (tmp_path / "res.partial" / "checkpoint-0.json").exists() and not out.exists()
    assert main([*args, "--resume"]) == 0
    assert not (out / "inputs.json").exists()
    resumed = json.loads((out / "report.json").read_text())
    assert main([*args[:-1], str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert resumed["tables"]["sites"] == ref["tables"]["sites"]


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "corrupt_config", "no_weights", "no_tokenizer",
                                  "unknown_arch"])
def test_bad_model_directories_fail_clearly(case, tiny_llama_dir, tmp_path, capsys):
    d = tmp_path / case
    if case == "file":
        d.write_text("x")
    elif case != "missing":
        shutil.copytree(tiny_llama_dir, d)
        if case == "no_config":
            (d / "config.json").unlink()
        elif case == "corrupt_config":
            (d / "config.json").write_text("{not json")
        elif case == "no_weights":
            (d / "model.safetensors").unlink()
        elif case == "no_tokenizer":
            for f in d.iterdir():
                if "token" in f.name or f.name in ("vocab.txt", "special_tokens_map.json"):
                    f.unlink()
        elif case == "unknown_arch":
            cfg = json.loads((d / "config.json").read_text())
            cfg["model_type"] = "not-a-real-arch"
            (d / "config.json").write_text(json.dumps(cfg))
    assert main(["profile", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("outlierkit: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists() or case
    with pytest.raises(ModelLoadError):
        load_model(str(d))


def test_bad_data_fails_clearly(tiny_llama_dir, tmp_path, capsys):
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    empty = tmp_path / "e.txt"
    empty.write_text("")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "hello"}\n')
    for path, needle in ((binary, "binary"), (empty, "empty"), (jsonl, "--text-field"),
                         (tmp_path / "nope.txt", "does not exist")):
        assert main(["profile", str(tiny_llama_dir), "--data", str(path), "--out", str(tmp_path / "o")]) == 2
        assert needle in capsys.readouterr().err
    assert main(["profile", str(tiny_llama_dir), "--seq-len", "100000", "--out", str(tmp_path / "o")]) == 2
    assert "exceeds the model's maximum" in capsys.readouterr().err


def test_few_samples_skip_the_int8_check_with_a_warning(tiny_llama_dir, tmp_path, capsys):
    # regression: --samples 1 failed because of the INT8 check the user did not ask about
    out = tmp_path / "one"
    assert main(["profile", str(tiny_llama_dir), "--samples", "1", "--seq-len", "16", "--level", "basic",
                 "--out", str(out)]) == 0
    assert "INT8 check needs at least 3 samples" in capsys.readouterr().err
    data = json.loads((out / "report.json").read_text())
    assert data["config"]["int8_check"] is False and data["tables"]["int8"] == []


def test_short_data_is_said_on_the_console(tiny_llama_dir, tmp_path, capsys, tok):
    # regression: a corpus with fewer documents than --samples silently profiled fewer samples, and then
    # failed on the INT8 check the user had not asked about
    data = tmp_path / "two.txt"
    data.write_text("First paragraph about outliers in language models. " * 12 + "\n\n" + "Second one. " * 60)
    out = tmp_path / "short"
    assert main(["profile", str(tiny_llama_dir), "--data", str(data), "--samples", "8", "--seq-len", "16",
                 "--level", "basic", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "only 2 of the 8 requested samples" in err and "the INT8 check needs at least 3 samples" in err
    assert err.count("the INT8 check needs at least 3 samples") == 1, err  # shown once, not echoed twice
    # regression: --seq-len below the 8-token minimum failed with "no document has at least 8 tokens"
    corpus = build_corpus(tok, load_documents([data]), samples=2, seq_len=4)
    assert len(corpus) == 2 and all(len(s) == 4 for s in corpus.samples)


def test_nan_forward_is_loud_and_exits_3(tmp_path, capsys):
    """A forward that produces NaN is not a success: console table of the NaN sites (also the all-NaN
    ones, which have no statistics), a one-line error, exit 3, and the report kept to diagnose it."""
    from outlierkit.cli import EXIT_UNUSABLE
    from outlierkit.llm.fixtures import tiny_model, tokenizer

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 0] = float("nan")  # NaN from layer 1's MLP onwards
    d = tmp_path / "nanllama"
    model.save_pretrained(d)
    tokenizer().save_pretrained(d)
    out = tmp_path / "nan"
    rc = main(["profile", str(d), "--samples", "3", "--seq-len", "16", "--level", "basic", "--out", str(out)])
    assert rc == EXIT_UNUSABLE == 3
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert err_lines[-1].startswith("outlierkit: error: the forward pass of nanllama produced NaN/Inf at 3 site")
    assert "warning: nanllama: " in captured.err and "NaN/Inf at layer_1.mlp" in captured.err  # not only report.md
    for site in ("layer_1.mlp", "layer_1.residual", "final_norm"):
        assert site in captured.err  # the console table lists the all-NaN sites
    data = json.loads((out / "report.json").read_text())
    rows = {r["site"]: r for r in data["tables"]["nonfinite_sites"]}
    assert set(rows) == {"layer_1.mlp", "layer_1.residual", "final_norm"}
    assert all(r["all_nonfinite"] and r["nonfinite_tokens"] > 0 for r in rows.values())
    assert data["metrics"]["nonfinite_sites"] == 3 and not (tmp_path / "nan.partial").exists()


def test_fp16_and_generic_fallback_warnings_reach_the_console(tmp_path, capsys):
    # regression: both warnings reached only report.md
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from outlierkit.llm.fixtures import tokenizer

    d = tmp_path / "neox"  # a family outside the architecture table: generic discovery
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tokenizer().save_pretrained(d)
    out = tmp_path / "fp16"
    assert main(["profile", str(d), "--dtype", "fp16", "--samples", "3", "--seq-len", "16", "--level", "basic",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: neox: fp16 can overflow") == 1  # once, although it is in the report too
    assert err.count("warning: neox: architecture 'gpt_neox' is not in outlierkit's table") == 1
    warnings_ = json.loads((out / "report.json").read_text())["warnings"]
    assert any("fp16" in w for w in warnings_) and any("generic discovery" in w for w in warnings_)


def test_corpus_sources_and_determinism(tok, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("First paragraph about outliers. " * 30 + "\n\n" + "Second one. " * 50)
    (tmp_path / "docs" / "b.jsonl").write_text(json.dumps({"text": "json line text " * 20}) + "\n\n")
    docs = load_documents([tmp_path / "docs"])
    assert {Path(d.source.split(":")[0]).name for d in docs} == {"a.txt", "b.jsonl"}
    default = load_documents(None)
    domains = {d.source.split(":")[1] for d in default}
    assert domains == {"prose", "docstrings", "code"}
    c1 = build_corpus(tok, default, samples=12, seq_len=32, seed=3)
    c2 = build_corpus(tok, default, samples=12, seq_len=32, seed=3)
    c3 = build_corpus(tok, default, samples=12, seq_len=32, seed=4)
    assert c1.samples == c2.samples and c1.samples != c3.samples
    assert all(len(s) <= 32 for s in c1.samples)
    lengths = [int(b.attention_mask.sum(1).max()) for b in c1.batches(4)]
    assert lengths == sorted(lengths, reverse=True)  # batches sorted by length
    with pytest.raises(DataError):
        load_documents([tmp_path / "missing"])


def test_generic_discovery_warns_and_profiles(corpus):
    from outlierkit.llm.profile import ProfileOptions, profile_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Linear(16, 16)
            self.ffn = nn.Linear(16, 16)

        def forward(self, x):
            return x + self.ffn(torch.relu(self.attention(x)))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "toy"})()
            self.emb = nn.Embedding(30522, 16)
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, input_ids, attention_mask=None):
            x = self.emb(input_ids)
            for b in self.blocks:
                x = b(x)
            return x

    model = Toy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mm = resolve(model)
    assert mm.generic and any("not in outlierkit's table" in str(w.message) for w in caught)
    assert "final norm" in " ".join(mm.unplaced)
    prof = profile_model(model, mm, corpus.subset(range(3)), ProfileOptions(calib_fraction=0.0))
    assert {s.kind for s in prof.sites} >= {"embedding", "residual", "attn", "mlp"}


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.profile import ProfileOptions, merge_distributed, profile_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        corpus = build_corpus(tokenizer(), load_documents(None), samples=8, seq_len=32, seed=1)
        prof = profile_model(model, resolve(model), corpus, ProfileOptions(batch_size=2), shard=(rank, world))
        merged = merge_distributed(prof)
        merged.save(Path(out_dir) / f"rank{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path, corpus):
    import socket

    import torch.multiprocessing as mp

    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.profile import ActivationProfile, ProfileOptions, profile_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model = tiny_model("llama")
    c = build_corpus(tokenizer(), load_documents(None), samples=8, seq_len=32, seed=1)
    single = profile_model(model, resolve(model), c, ProfileOptions(batch_size=2))
    for rank in (0, 1):
        merged = ActivationProfile.load(tmp_path / f"rank{rank}")
        for name, st in single.stats.items():
            o = merged.stats[name]
            assert o.count == st.count and o.vmax == pytest.approx(st.vmax) and o.loc_max == st.loc_max
            assert o.s2 == pytest.approx(st.s2, rel=1e-6)
            torch.testing.assert_close(o.hist, st.hist)


def _cli_rank(rank, world, port, argv, interrupt_at, codes):
    """One torchrun-like rank running the CLI; ``interrupt_at`` batches in, a KeyboardInterrupt (Ctrl-C)."""
    import torch.distributed as dist

    import outlierkit.llm.profile as prof_mod

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OUTLIERKIT_QUIET="1")
    if interrupt_at:
        real, calls = prof_mod.Collector.begin_batch, {"n": 0}

        def flaky(self, batch, device):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                raise KeyboardInterrupt
            return real(self, batch, device)

        prof_mod.Collector.begin_batch = flaky
    try:
        codes[rank] = main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_torchrun_writes_checkpoints_per_rank_and_resumes(tiny_llama_dir, tmp_path):
    # regression: under torchrun no checkpoint was written, so an interrupted run could not resume
    import socket

    import torch.multiprocessing as mp

    def spawn(argv, interrupt_at=0):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        codes = mp.Manager().dict()
        mp.spawn(_cli_rank, args=(2, port, argv, interrupt_at, codes), nprocs=2, join=True)
        return [codes[r] for r in range(2)]

    out = tmp_path / "dist"
    argv = ["profile", str(tiny_llama_dir), "--samples", "12", "--seq-len", "24", "--batch-size", "2",
            "--checkpoint-every", "1", "--level", "basic", "--out", str(out)]
    assert spawn(argv, interrupt_at=2) == [130, 130]
    stage = tmp_path / "dist.partial"
    assert {f.name for f in stage.glob("checkpoint-*.json")} == {"checkpoint-0-rank0of2.json",
                                                                 "checkpoint-0-rank1of2.json"}
    assert spawn([*argv, "--resume"]) == [0, 0]
    assert not stage.exists() and not list(out.glob("checkpoint-*"))
    resumed = json.loads((out / "report.json").read_text())
    assert spawn([*argv[:-1], str(tmp_path / "ref")]) == [0, 0]
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert resumed["tables"]["sites"] == ref["tables"]["sites"] and resumed["config"]["world_size"] == 2


def test_real_minilm_has_outlier_channels(tmp_path):
    lm = load_model("minilm")
    assert lm.map.spec.name == "bert" and not lm.map.generic
    from outlierkit.llm.profile import ProfileOptions, profile_model

    corpus = build_corpus(lm.tokenizer, load_documents(None), samples=9, seq_len=64, seed=0)
    prof = profile_model(lm.model, lm.map, corpus, ProfileOptions(batch_size=3))
    name, value, loc = prof.global_max()
    st = prof.stats[name]
    # a handful of channels carry the peak: far above the median channel
    assert abs(value) > 30 and float(st.ch_absmax.max() / st.ch_absmax.median()) > 20
    # per-tensor INT8 with a 99.9th-percentile threshold clips the outliers and loses to absmax at the peak
    assert prof.int8[name]["p99.9"].sqnr_db < prof.int8[name]["absmax"].sqnr_db


@pytest.mark.skipif(sys.platform != "linux", reason="console script check")
def test_module_entry_point():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "outlierkit", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("outlierkit")


def test_demo_and_report_commands(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--samples", "6", "--no-quantize"]) == 0
    text = capsys.readouterr().out
    assert "Largest activations" in text and "Outlier channels" in text
    assert (out / "report.md").exists()
    assert main(["report", "show", str(out)]) == 0
    assert "global_max" in capsys.readouterr().out
    assert main(["report", "diff", str(out), str(out)]) == 0

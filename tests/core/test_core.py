"""Shared modules: registry, config, report, staged outputs, HookSet, CLI dispatch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch
from torch import nn

from outlierkit import ConfigError, OutputExistsError, Registry, Report, UnknownNameError
from outlierkit._utils import HookSet, atomic_write_text, safe_torch_load, staged_output
from outlierkit._utils.hooks import count_hooks
from outlierkit.cli import main
from outlierkit.config import apply_overrides, from_dict, load_mapping


def test_registry_unknown_name_lists_valid_names():
    reg: Registry[int] = Registry("thing")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg
    with pytest.raises(UnknownNameError, match="valid names: a, b"):
        reg.get("c")
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("a")(3)


@dataclass(frozen=True)
class Inner:
    k: int = 3


@dataclass(frozen=True)
class Cfg:
    alpha: float = 0.5
    mode: Literal["x", "y"] = "x"
    sizes: tuple[int, ...] = (1, 2)
    name: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_config_from_dict_and_overrides():
    cfg = from_dict(Cfg, {"alpha": "0.8", "sizes": [4, 8], "inner": {"k": 5}})
    assert cfg == Cfg(alpha=0.8, sizes=(4, 8), inner=Inner(5))
    cfg2 = apply_overrides(cfg, ["mode=y", "inner.k=7", "flag=true", "name=abc", "sizes=1,2,3"])
    assert cfg2.mode == "y" and cfg2.inner.k == 7 and cfg2.flag is True and cfg2.sizes == (1, 2, 3)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(Cfg, {"alhpa": 1})
    with pytest.raises(ConfigError, match="must be one of"):
        apply_overrides(cfg, ["mode=z"])
    with pytest.raises(ConfigError, match="unknown override key"):
        apply_overrides(cfg, ["inner.q=1"])
    with pytest.raises(ConfigError, match="integer"):
        apply_overrides(cfg, ["inner.k=1.5"])


def test_load_mapping_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_mapping(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_mapping(lst)
    with pytest.raises(ConfigError, match="does not exist"):
        load_mapping(tmp_path / "missing.yaml")


def test_report_roundtrip(tmp_path):
    rep = Report(kind="test.kind", config={"a": 1})
    rep.metrics["x"] = float("nan")
    rep.metrics["y"] = 2.5
    rep.add_table("rows", [{"a": 1, "b": torch.tensor(2.0)}])
    rep.warn("careful")
    rep.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema"] == 1 and data["kind"] == "test.kind" and data["metrics"]["x"] == "nan"
    assert data["tables"]["rows"] == [{"a": 1, "b": 2.0}]
    md = (tmp_path / "report.md").read_text()
    assert "careful" in md and "| rows |" not in md and "## rows" in md
    assert Report.load(tmp_path).metrics["y"] == 2.5


def test_staged_output_is_atomic(tmp_path):
    out = tmp_path / "run"
    with staged_output(out) as stage:
        atomic_write_text(stage / "a.txt", "1")
        atomic_write_text(stage / "report.json", "{}")  # --force replaces only earlier outputs
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(OutputExistsError, match="--force"):
        with staged_output(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_output(out, force=True) as stage:
            atomic_write_text(stage / "b.txt", "2")
            raise RuntimeError("boom")
    # the failed run left the old output intact and no staging directory behind
    assert (out / "a.txt").exists() and not (out / "b.txt").exists()
    assert not (tmp_path / "run.partial").exists()
    with staged_output(out, force=True) as stage:
        atomic_write_text(stage / "c.txt", "3")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]


def test_hookset_removes_hooks_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError):
        with HookSet() as hooks:
            hooks.forward(model[0], lambda m, a, o: None)
            hooks.forward_pre(model[1], lambda m, a: None)
            assert count_hooks(model) == 2
            raise ValueError
    assert count_hooks(model) == 0


def test_safe_torch_load(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["w"].sum() == 2
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="corrupt"):
        safe_torch_load(tmp_path / "bad.pt")


def test_cli_dispatch(capsys):
    assert main(["--version"]) == 0
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 2


def test_utils_log_stays_the_function_after_submodule_import():
    # regression: a lazy package attribute `log` was replaced by the submodule of the same name
    import importlib

    importlib.import_module("outlierkit._utils.log")
    from outlierkit._utils import log

    assert callable(log) and not hasattr(log, "__path__") and log.__name__ == "log"


def test_light_commands_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from outlierkit.cli import main; import outlierkit.graph.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

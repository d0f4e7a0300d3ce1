"""``Report``: the one output format (``report.json`` + ``report.md`` + PNG plots) of every run."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outlierkit._utils.io import atomic_write_bytes, atomic_write_text
from outlierkit.config import to_dict
from outlierkit.errors import DataError

SCHEMA_VERSION = 1
Scalar = float | int | str | bool | None


def environment() -> dict[str, Any]:
    """What a reader needs to repeat the run: versions, platform, threads, devices, git commit."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    for mod in ("transformers", "torch_geometric", "compressed_tensors"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
        env["git_sha"] = sha or None
    except (OSError, subprocess.SubprocessError):
        env["git_sha"] = None
    return env


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/Inf become strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _clean(value.item())
        except (ValueError, RuntimeError):
            pass
    return to_dict(value)


@dataclass
class Report:
    """A run's results: flat ``metrics``, flat ``tables`` of row dicts, ``artifacts`` and ``warnings``.

    Args:
        kind: what produced it, e.g. ``"llm.profile"``, ``"graph.bench"``, ``"diffusion.hex"``.
        config: the fully resolved config, so the run can be repeated.
    """

    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Scalar] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Scalar]]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    env: dict[str, Any] = field(default_factory=environment)

    def warn(self, message: str) -> None:
        """Record a warning in the report and show it on the console (stderr), once per message."""
        from outlierkit._utils.log import warning

        if message not in self.warnings:
            self.warnings.append(message)
        warning(message)

    def add_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.tables[name] = [{str(k): _clean(v) for k, v in row.items()} for row in rows]

    def to_json_dict(self) -> dict[str, Any]:
        from outlierkit import __version__

        return {
            "schema": SCHEMA_VERSION,
            "kind": self.kind,
            "created": self.created,
            "version": __version__,
            "env": _clean(self.env),
            "config": _clean(self.config),
            "metrics": _clean(self.metrics),
            "tables": _clean(self.tables),
            "artifacts": dict(self.artifacts),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``report.json`` and ``report.md`` atomically into ``out_dir``; returns the JSON path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_json_dict()
        atomic_write_text(out / "report.json", json.dumps(data, indent=2, allow_nan=False) + "\n")
        atomic_write_text(out / "report.md", render_markdown(data))
        return out / "report.json"

    @classmethod
    def load(cls, path: str | Path) -> Report:
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read report {p}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not data["kind"]:
            raise DataError(f"{p} is not an outlierkit report (no 'kind' field); pass the report.json a command "
                            "wrote")
        for key, typ in (("config", dict), ("metrics", dict), ("tables", dict), ("artifacts", dict),
                         ("warnings", list), ("notes", list), ("env", dict)):
            if not isinstance(data.get(key, typ()), typ):
                raise DataError(f"{p}: field {key!r} must be a JSON {'object' if typ is dict else 'array'}; "
                                "the report is corrupt")
        return cls(
            kind=data["kind"], config=data.get("config", {}), metrics=data.get("metrics", {}),
            tables=data.get("tables", {}), artifacts=data.get("artifacts", {}),
            warnings=data.get("warnings", []), notes=data.get("notes", []),
            created=data.get("created", ""), env=data.get("env", {}),
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], max_rows: int | None = None) -> str:
    if not rows:
        return "_(empty)_\n"
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    shown = rows if max_rows is None else rows[:max_rows]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in shown]
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"\n_{len(rows) - max_rows} more rows in report.json_")
    return "\n".join(lines) + "\n"


def render_markdown(data: dict[str, Any], max_rows: int = 40) -> str:
    """Human-readable rendering of a report dict (what ``report.md`` holds)."""
    out = [f"# outlierkit report: {data['kind']}", "", f"created {data['created']}, outlierkit "
           f"{data['version']}, torch {data['env'].get('torch', '?')}", ""]
    for note in data.get("notes", []):
        out += [note, ""]
    if data.get("warnings"):
        out += ["## Warnings", ""] + [f"- {w}" for w in data["warnings"]] + [""]
    if data.get("metrics"):
        out += ["## Metrics", "", markdown_table([{"metric": k, "value": v} for k, v in data["metrics"].items()]),
                ""]
    for name, rows in data.get("tables", {}).items():
        out += [f"## {name}", "", markdown_table(rows, max_rows), ""]
    if data.get("artifacts"):
        out += ["## Artifacts", ""]
        for name, rel in data["artifacts"].items():
            out.append(f"![{name}]({rel})" if str(rel).endswith(".png") else f"- {name}: `{rel}`")
        out.append("")
    out += ["## Config", "", "```json", json.dumps(data.get("config", {}), indent=2), "```", ""]
    return "\n".join(out)


def save_figure(fig: Any, out_dir: str | Path, name: str, report: Report | None = None) -> Path:
    """Save a matplotlib figure as ``out_dir/name.png`` atomically and list it in the report."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    path = Path(out_dir) / f"{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    if report is not None:
        report.artifacts[name] = path.name
    return path


def new_figure(*args: Any, **kwargs: Any) -> Any:
    """A matplotlib (fig, ax) pair on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)

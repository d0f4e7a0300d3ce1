"""``outlierkit report show|diff``: print a report's metrics, or compare the metrics of two reports."""

from __future__ import annotations

import argparse

from outlierkit.errors import ConfigError
from outlierkit.report import Report, markdown_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print a report's metrics and tables")
    show.add_argument("report", help="a report.json or the directory holding it")
    diff = sub.add_parser("diff", help="compare the numeric metrics of two reports")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--allow-mixed", action="store_true",
                      help="compare reports of different kinds (e.g. llm.profile and llm.eval) anyway")


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        rep = Report.load(args.report)
        print(f"# {rep.kind} ({rep.created})")
        print(markdown_table([{"metric": k, "value": v} for k, v in rep.metrics.items()]))
        for name, rows in rep.tables.items():
            print(f"## {name}\n" + markdown_table(rows, max_rows=20))
        return 0
    a, b = Report.load(args.a), Report.load(args.b)
    if a.kind != b.kind and not args.allow_mixed:
        raise ConfigError(f"{args.a} is a {a.kind} report and {args.b} a {b.kind} report; their metrics do not "
                          "compare (pass --allow-mixed to list them side by side anyway)")
    if a.kind != b.kind:
        print(f"# {a.kind} (a) vs {b.kind} (b): different kinds, shared metric names only coincide")
    rows = []
    for key in sorted(set(a.metrics) | set(b.metrics)):
        va, vb = a.metrics.get(key), b.metrics.get(key)
        row = {"metric": key, "a": va, "b": vb}
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            row["b - a"] = vb - va
        rows.append(row)
    print(markdown_table(rows))
    return 0

"""``outlierkit report show|diff``: print a report's metrics, or compare the metrics of two reports."""

from __future__ import annotations

import argparse

from outlierkit.report import Report, markdown_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print a report's metrics and tables")
    show.add_argument("report", help="a report.json or the directory holding it")
    diff = sub.add_parser("diff", help="compare the numeric metrics of two reports")
    diff.add_argument("a")
    diff.add_argument("b")


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        rep = Report.load(args.report)
        print(f"# {rep.kind} ({rep.created})")
        print(markdown_table([{"metric": k, "value": v} for k, v in rep.metrics.items()]))
        for name, rows in rep.tables.items():
            print(f"## {name}\n" + markdown_table(rows, max_rows=20))
        return 0
    a, b = Report.load(args.a), Report.load(args.b)
    rows = []
    for key in sorted(set(a.metrics) | set(b.metrics)):
        va, vb = a.metrics.get(key), b.metrics.get(key)
        row = {"metric": key, "a": va, "b": vb}
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            row["b - a"] = vb - va
        rows.append(row)
    print(markdown_table(rows))
    return 0

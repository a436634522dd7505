"""``edgectl``'s output: JSON documents on stdout, rich tables and live rollout progress
(progress and problems on stderr, so ``--json`` output stays one document).

rich loads inside the functions that draw: ``edgectl --json`` never imports it.

Must never: connect, publish or decide an exit code (``commands`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from agent.cloud.rollout import RolloutReport, StagedRollout


def consoles(args: argparse.Namespace) -> tuple[Any, Any]:
    from rich.console import Console

    # Piped output is still read by people; 80 columns would fold the node table.
    out_width = None if sys.stdout.isatty() else 160
    err_width = None if sys.stderr.isatty() else 160
    return (
        Console(width=out_width, highlight=False),
        Console(stderr=True, width=err_width, highlight=False),
    )


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def ago(iso: str) -> str:
    seconds = max(0.0, (datetime.now() - datetime.fromisoformat(iso)).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def dash(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def print_nodes(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The node table (``edgectl nodes``) on stdout."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out, _ = consoles(args)
    colours = {"online": "green", "offline": "red", "degraded": "yellow", "syncing": "cyan"}
    # Rich measures every cell: plain Text cells and a light box keep 1,000 rows near 1 s.
    table = Table(
        title=f"{len(rows)} nodes under {args.prefix}/",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for name in ("node", "status", "last seen", "cpu", "memory", "functions", "outbox"):
        right = name in ("cpu", "outbox")
        table.add_column(name, justify="right" if right else "left", no_wrap=name != "functions")
    for row in rows:
        memory = (
            "-"
            if row["memory_used_mb"] is None
            else f"{row['memory_used_mb']:.0f}/{row['memory_total_mb']:.0f} MB"
        )
        status = row["status"]
        table.add_row(
            row["id"],
            Text(status, style=colours.get(status, "")),
            ago(row["last_seen"]),
            dash(row["cpu_percent"], "{:.1f}%"),
            memory,
            ", ".join(row["functions"]) or "-",
            dash(row["outbox"]),
        )
    out.print(table)


def progress_printer(args: argparse.Namespace) -> tuple[Any, Callable[[str, RolloutReport], None]]:
    """A rich progress display (stderr) and the callback that feeds it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _, err = consoles(args)
    progress = Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=err,
    )
    tasks: dict[str, Any] = {}

    def on_progress(phase: str, report: RolloutReport) -> None:
        counts = report.counts()
        total = len(report.results)
        text = "  ".join(f"{k} {v}" for k, v in counts.items() if v)
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total, counts=text)
        progress.update(tasks[phase], completed=total - counts["pending"], counts=text)

    return progress, on_progress


def report_problems(args: argparse.Namespace, report: RolloutReport, title: str) -> None:
    from rich.table import Table

    bad = [r for r in report.results.values() if r.state != "active"]
    if not bad:
        return
    _, err = consoles(args)
    table = Table(title=title, title_justify="left")
    for name in ("node", "result", "serving"):
        table.add_column(name, no_wrap=True)
    table.add_column("error", overflow="fold")
    for result in sorted(bad, key=lambda r: (r.state, r.node_id))[:20]:
        error = result.error or {}
        message = f"{error.get('type', '')}: {error.get('message', '')}" if error else ""
        table.add_row(result.node_id, result.state, result.active_version or "-", message)
    err.print(table)
    if len(bad) > 20:
        err.print(f"... and {len(bad) - 20} more")


def summary(report: RolloutReport) -> str:
    counts = "  ".join(f"{k} {v}" for k, v in report.counts().items() if v) or "no nodes"
    late = " (deadline passed)" if report.timed_out else ""
    return f"{report.function_id} {report.version}: {counts} in {report.elapsed_s:.1f}s{late}"


def print_staged(args: argparse.Namespace, result: StagedRollout) -> None:
    """A staged rollout's outcome: canaries, then the rollback or the fleet phase."""
    if args.json:
        emit_json(result.to_dict())
        return
    print(f"canaries: {', '.join(result.canaries)}")
    print(f"  {summary(result.canary)}")
    for note in result.notes:
        print(f"  {note}")
    if result.rolled_back:
        report_problems(args, result.canary, "canaries not active")
        if result.rollback is not None:
            print(f"rolled back: {summary(result.rollback)}")
        else:
            print("rolled back: the canaries had no previous version (function removed)")
    elif result.fleet is not None:
        report_problems(args, result.fleet, "nodes not active")
        print(f"fleet: {summary(result.fleet)}")

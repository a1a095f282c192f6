"""Turn a benchmark's result file into markdown: its tables, their notes, and the environment it ran in.

    python -m scripts.bench.render docs/results/memory.json            # every table
    python -m scripts.bench.render docs/results/memory.json --table 2  # the second table only
    python -m scripts.bench.render --docs docs/benchmarks.md [--check]  # every generated block of a doc

Docs tables are generated this way from committed result files, never edited by hand: a doc marks each block
``<!-- generated: RESULT [--table N ...] [--level N] -->`` ... ``<!-- end generated -->`` (RESULT relative to
the doc), ``--docs`` rewrites every block from its result file, and ``--check`` (run by the tests) lists the
blocks that differ from what their result file renders.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def markdown_table(tab: dict[str, Any], level: int = 3) -> list[str]:
    lines = [f"{'#' * level} {tab['title']}", ""] if tab.get("title") else []
    if tab.get("notes"):
        lines += [f"- {note}" for note in tab["notes"]] + [""]
    lines += ["| " + " | ".join(tab["columns"]) + " |", "|" + " --- |" * len(tab["columns"])]
    lines += ["| " + " | ".join(row) + " |" for row in tab["rows"]]
    return lines + [""]


def environment_lines(env: dict[str, Any]) -> list[str]:
    installed = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    return [
        f"- ran on {env['device_name']} ({env['device']}, {env['threads']} torch threads, {env['cpu_cores']} cores), "
        f"{env['date']}, commit {env['commit'] or 'unknown'}; {installed}",
        f"- command: `{env['command']}`",
    ]


def render(result: dict[str, Any], tables: Sequence[int] | None = None, level: int = 3) -> str:
    """The chosen tables (1-based; default all), then the run's notes and environment."""
    chosen = [t for n, t in enumerate(result.get("tables", []), 1) if not tables or n in tables]
    lines: list[str] = []
    for tab in chosen:
        lines += markdown_table(tab, level)
    lines += [f"- note: {note}" for note in result.get("notes", [])]
    if "environment" in result:
        lines += environment_lines(result["environment"])
    return "\n".join(lines).rstrip() + "\n"


GENERATED = re.compile(r"(<!-- generated: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _block_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="generated block")
    parser.add_argument("result", type=Path)
    parser.add_argument("--table", type=int, action="append")
    parser.add_argument("--level", type=int, default=3)
    return parser.parse_args(argv)


def regenerate(doc: Path, check: bool = False) -> list[str]:
    """Render every generated block of ``doc`` from its result file; rewrite the doc unless ``check``. Returns
    the blocks (their marker arguments) whose text differed."""
    stale: list[str] = []

    def block(match: re.Match) -> str:
        args = _block_args(shlex.split(match["args"]))
        body = render(json.loads((doc.parent / args.result).read_text()), args.table, args.level)
        if body != match["body"]:
            stale.append(match["args"])
        return match[1] + body + match[4]

    text = GENERATED.sub(block, doc.read_text())
    if not check:
        doc.write_text(text)
    return stale


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, nargs="?", help="a result file written with --json")
    parser.add_argument("--table", type=int, action="append", help="render only this table (1-based; repeatable)")
    parser.add_argument("--level", type=int, default=3, help="heading level of the table titles (default 3)")
    parser.add_argument("--docs", type=Path, help="rewrite every generated block of this markdown file instead")
    parser.add_argument("--check", action="store_true", help="with --docs: only list stale blocks (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.docs is not None:
        stale = regenerate(args.docs, args.check)
        text = "".join(f"stale: {block}\n" for block in stale)
        print(text, end="")
        if args.check and stale:
            raise SystemExit(1)
        return text
    if args.result is None:
        parser.error("give a result file, or --docs")
    text = render(json.loads(args.result.read_text()), args.table, args.level)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()

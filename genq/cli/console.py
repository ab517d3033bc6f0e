"""What every genq command shares on the terminal: the stderr console, the progress bar, exit statuses,
and where an error file goes next to its output file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

# soft_wrap: a message is one line however long (paths make it so), not cut at 80 columns when piped.
console = Console(stderr=True, soft_wrap=True)

EXIT_SYSTEM_FAILURE = 1
EXIT_INVALID_INPUT = 2


class _TokensPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        elapsed = task.elapsed or 0.0
        tokens = task.fields.get("tokens", 0)
        return Text(f"{tokens / elapsed:,.1f} tok/s" if elapsed > 0 else "- tok/s", style="progress.data.speed")


def progress_bar() -> Progress:
    """A bar of requests done, with completion tokens per second (task field "tokens") and an ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _TokensPerSecond(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def errors_path(out: Path) -> Path:
    """The error file next to output file out: x.output.jsonl or x.jsonl -> x.errors.jsonl."""
    name = out.name
    if name.endswith(".output.jsonl"):
        return out.with_name(name[: -len(".output.jsonl")] + ".errors.jsonl")
    return out.with_name((name[: -len(".jsonl")] if name.endswith(".jsonl") else name) + ".errors.jsonl")

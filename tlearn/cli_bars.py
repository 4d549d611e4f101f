"""rich progress bars on stderr, shared by the CLI commands (cli.py, cli_train.py)."""

from __future__ import annotations


class Bars:
    """One bar per stage while `enabled` (a terminal, not --quiet). Called as the
    library's progress callback: (stage, done, total). With `info`, a text column after
    the bar that `update(task, info=...)` fills (training: loss and accuracy)."""

    def __init__(self, console, enabled: bool, info: bool = False):
        self.console = console
        self.enabled = enabled
        self.info = info
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            last = TextColumn("{task.fields[info]}") if self.info else TimeRemainingColumn()
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                last,
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def add(self, description: str, total: int) -> int:
        fields = {"info": ""} if self.info else {}
        return self.progress.add_task(description, total=total, **fields)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.add(stage, total)
        self.progress.update(self.tasks[stage], completed=done, total=total)

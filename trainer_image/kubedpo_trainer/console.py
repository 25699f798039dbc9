"""What a person at a terminal sees of a run: a live progress line, eval tables and a summary.

Pods and pipes keep getting the JSON lines (greppable, parsed by log stacks); a terminal gets a
rich display instead, because a wall of JSON is unreadable while one watches a run. The choice
is `--log-format auto|json|rich` (env `KUBEDPO_LOG_FORMAT`, which the launcher passes to every
rank): `auto` means rich when stdout is a terminal. Only global rank 0 draws; the other ranks
log warnings only, so their lines do not tear the display.

The numbers shown (tokens/s, ETA) are the ones `progress.StepLogger` computes for the JSON
lines and Prometheus: the display formats them and never estimates on its own.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


@functools.cache
def terminal() -> Console:
    """The one Console of this process, shared by the live display and the log handler.

    Sharing matters: rich prints log records above a live display only when both write
    through the same Console.
    """
    return Console(file=sys.stdout)


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _num(values: Mapping[str, Any], key: str, fmt: str) -> str:
    v = values.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(float(v), fmt)


def status_line(row: Mapping[str, Any]) -> Text:
    """The text after the bar: step/total, loss, reward accuracy, margin, tokens/s, ETA."""
    step, total = int(row.get("step", 0)), int(row.get("total_steps", 0))
    return Text.assemble(
        ("step ", "dim"), (f"{step}/{total}", "bold"),
        ("  loss ", "dim"), _num(row, "loss", ".4f"),
        ("  reward acc ", "dim"), _num(row, "rewards_accuracies", ".3f"),
        ("  margin ", "dim"), _num(row, "rewards_margins", ".3f"),
        ("  tok/s ", "dim"), _num(row, "job_tokens_per_second" if "job_tokens_per_second" in row
                                  else "tokens_per_second", ",.0f"),  # the job's (all ranks) when known
        ("  ETA ", "dim"), format_duration(row.get("eta_seconds")),
    )


EVAL_COLUMNS = (("loss", "eval_loss", ".4f"), ("reward acc", "eval_rewards_accuracies", ".3f"),
                ("margin", "eval_rewards_margins", ".3f"), ("chosen", "eval_rewards_chosen", ".3f"),
                ("rejected", "eval_rewards_rejected", ".3f"))


def eval_table(step: int, values: Mapping[str, Any]) -> Table:
    table = Table(title=f"eval at step {step}", title_justify="left", expand=False)
    for header, _, _ in EVAL_COLUMNS:
        table.add_column(header, justify="right")
    table.add_row(*(_num(values, key, fmt) for _, key, fmt in EVAL_COLUMNS))
    return table


def summary_table(rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title="run summary", title_justify="left", show_header=False, expand=False)
    table.add_column("what", style="dim")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    return table


class RichDisplay:
    """A live bar with the latest logged values; eval tables and the summary print above it."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None) -> None:
        self.console = console or terminal()
        self.row: dict[str, Any] = {"step": start_step, "total_steps": total_steps}
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def _render(self) -> RenderableType:
        total = max(int(self.row.get("total_steps", 0)), 1)
        bar = ProgressBar(total=total, completed=min(int(self.row.get("step", 0)), total), width=24)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(Text("DPO", style="bold cyan"), bar, status_line(self.row))
        return Group(grid)

    def train(self, row: Mapping[str, Any]) -> None:
        self.row = dict(row)
        self._live.update(self._render(), refresh=True)

    def eval(self, step: int, values: Mapping[str, Any]) -> None:
        self.console.print(eval_table(step, values))

    def close(self, summary: Sequence[tuple[str, str]] | None = None) -> None:
        self._live.update(self._render(), refresh=True)
        self._live.stop()
        if summary:
            self.console.print(summary_table(summary))


def summary_rows(summary: Mapping[str, Any], output_uri: str, curves_uri: str | None) -> list[tuple[str, str]]:
    """The end-of-run table: what was trained, how fast, how well, and where it went."""
    train, ev, ev0 = summary.get("train") or {}, summary.get("eval") or {}, summary.get("eval_at_start") or {}
    seconds = float(summary.get("seconds") or 0.0)
    rows = [
        ("steps", f"{summary.get('step', 0)}/{summary.get('total_steps', 0)}"),
        ("wall time", format_duration(seconds)),
        ("train loss", _num(train, "loss", ".4f")),
        ("train reward acc", _num(train, "rewards_accuracies", ".3f")),
        ("train margin", _num(train, "rewards_margins", ".3f")),
    ]
    if ev:
        before = (f"{_num(ev0, 'eval_rewards_accuracies', '.3f')} -> " if ev0 else "")
        rows += [("eval loss", _num(ev, "eval_loss", ".4f")),
                 ("eval reward acc" + (" (step 0 -> end)" if ev0 else ""), before + _num(ev, "eval_rewards_accuracies", ".3f")),
                 ("eval margin" + (" (step 0 -> end)" if ev0 else ""), (f"{_num(ev0, 'eval_rewards_margins', '.3f')} -> " if ev0 else "")
                  + _num(ev, "eval_rewards_margins", ".3f"))]
    data = summary.get("data") or {}
    if data:
        rows.append(("rows read / bad / truncated",  # never silent: see data.onBadRecord
                     f"{data.get('rows', 0)} / {data.get('bad_records', 0)} / "
                     f"{data.get('truncated_prompts', 0) + data.get('truncated_responses', 0)}"))
    rows.append(("output", output_uri))
    if curves_uri:
        rows.append(("training curves", curves_uri))
    return rows

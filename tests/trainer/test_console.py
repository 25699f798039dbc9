"""The terminal view (console.py) and the training-curve PNG (curves.py): pure parts, no run."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from kubedpo_trainer.config import resolve_log_format
from kubedpo_trainer.console import (
    RichDisplay,
    eval_table,
    format_duration,
    status_line,
    summary_rows,
)
from kubedpo_trainer.curves import render_png


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_format_auto_is_rich_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBEDPO_LOG_FORMAT", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert resolve_log_format(None, _Tty()) == "rich"
    assert resolve_log_format(None, io.StringIO()) == "json"  # a pipe or a pod's log
    assert resolve_log_format("json", _Tty()) == "json"  # --log-format json wins on a terminal
    monkeypatch.setenv("TERM", "dumb")
    assert resolve_log_format(None, _Tty()) == "json"
    monkeypatch.setenv("KUBEDPO_LOG_FORMAT", "rich")  # what the launcher hands its ranks
    assert resolve_log_format(None, io.StringIO()) == "rich"


def test_bad_log_format_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEDPO_LOG_FORMAT", "fancy")
    with pytest.raises(ValueError, match="KUBEDPO_LOG_FORMAT.*'fancy'.*auto, json, rich"):
        resolve_log_format()


def test_status_line_shows_what_the_issue_asks_for() -> None:
    row = {"step": 120, "total_steps": 256, "loss": 0.41234, "rewards_accuracies": 0.875,
           "rewards_margins": 1.25, "tokens_per_second": 6243.0, "eta_seconds": 75.2}
    text = status_line(row).plain
    for part in ("step 120/256", "loss 0.4123", "reward acc 0.875", "margin 1.250", "tok/s 6,243", "ETA 01:15"):
        assert part in text, (part, text)
    assert "ETA --:--" in status_line({"step": 0, "total_steps": 9, "eta_seconds": float("nan")}).plain
    assert "tok/s 12,486" in status_line({**row, "job_tokens_per_second": 12486.0}).plain  # the job's when known


@pytest.mark.parametrize(("seconds", "shown"), [(0, "00:00"), (59.6, "01:00"), (3725, "1:02:05"),
                                                (float("inf"), "--:--"), (None, "--:--"), (-1, "--:--")])
def test_format_duration(seconds: float | None, shown: str) -> None:
    assert format_duration(seconds) == shown


def _render(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_eval_table_and_summary() -> None:
    text = _render(eval_table(50, {"eval_loss": 0.5, "eval_rewards_accuracies": 0.75, "eval_rewards_margins": 0.3}))
    assert "eval at step 50" in text and "0.5000" in text and "0.750" in text and "0.300" in text
    summary = {"step": 256, "total_steps": 256, "seconds": 12.3, "train": {"loss": 0.1},
               "eval": {"eval_rewards_accuracies": 1.0, "eval_rewards_margins": 2.24, "eval_loss": 0.1},
               "eval_at_start": {"eval_rewards_accuracies": 0.0, "eval_rewards_margins": 0.0},
               "data": {"rows": 4096, "bad_records": 1, "truncated_prompts": 2, "truncated_responses": 3}}
    rows = dict(summary_rows(summary, "/out", "/out/training_curves.png"))
    assert rows["steps"] == "256/256" and rows["eval reward acc (step 0 -> end)"] == "0.000 -> 1.000"
    assert rows["rows read / bad / truncated"] == "4096 / 1 / 5"
    assert rows["training curves"] == "/out/training_curves.png"


def test_live_display_draws_steps_and_prints_the_summary() -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=True, color_system=None)
    display = RichDisplay(total_steps=10, console=console)
    display.train({"step": 5, "total_steps": 10, "loss": 0.6, "eta_seconds": 3.0})
    display.eval(5, {"eval_loss": 0.55})
    display.close([("steps", "10/10")])
    text = out.getvalue()
    assert "step 5/10" in text and "loss 0.6000" in text and "eval at step 5" in text and "run summary" in text


def test_curves_png_is_a_real_picture() -> None:
    train = [{"step": s, "loss": 0.7 - s / 100, "rewards_accuracies": s / 50, "rewards_margins": s / 10}
             for s in range(10, 51, 10)]
    evals = [{"step": 0, "eval_loss": 0.69, "eval_rewards_accuracies": 0.0, "eval_rewards_margins": 0.0},
             {"step": 50, "eval_loss": 0.2, "eval_rewards_accuracies": 0.9, "eval_rewards_margins": 2.0}]
    png = render_png(train, evals, title="t")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    assert img.size == (1260, 340)
    assert len(set(img.convert("RGB").getdata())) > 50  # lines and text were drawn, not a blank canvas

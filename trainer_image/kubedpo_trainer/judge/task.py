"""Entry point of task judge (placeholder until the task lands: refuses the config, exit 2)."""

from __future__ import annotations

from ..config import TrainerConfig
from ..errors import ConfigError
from ..signals import StopRequest


def run_judge(cfg: TrainerConfig, stop: StopRequest) -> None:
    raise ConfigError("task: judge is not available in this build")

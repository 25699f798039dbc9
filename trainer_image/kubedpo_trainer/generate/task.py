"""Entry point of task generate (placeholder until the task lands: refuses the config, exit 2)."""

from __future__ import annotations

from ..config import TrainerConfig
from ..errors import ConfigError
from ..signals import StopRequest


def run_generate(cfg: TrainerConfig, stop: StopRequest) -> None:
    raise ConfigError("task: generate is not available in this build")

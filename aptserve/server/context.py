"""What the routes reach through `app.state.services`: the parts `create_app` wires together, built once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aptserve.engines.backends.options import RunOptions
from aptserve.server.auth import KeyRing
from aptserve.server.generation import Generation
from aptserve.server.jobs import JobManager
from aptserve.server.metrics import Metrics
from aptserve.server.settings import Settings
from aptserve.server.store import JobStore
from aptserve.server.worker import EngineWorker


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    worker: EngineWorker
    store: JobStore
    generation: Generation
    jobs: JobManager
    run_options: RunOptions
    device: str
    keys: KeyRing
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.generation.model_name

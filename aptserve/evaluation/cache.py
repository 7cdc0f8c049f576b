"""Per-system results cached on disk under a key of everything they depend on, the checkpoint's bytes included."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from aptserve.engines.loading import CONFIG_NAME
from aptserve.evaluation.classifier import classifier_key
from aptserve.evaluation.config import RUN_DEFAULTS, EvalConfig, SystemSpec
from aptserve.evaluation.images import slug


def model_fingerprint(model: str, prompt_grammar: bool = True) -> str:
    """sha256 over a checkpoint folder's files (names and bytes); a preset name stands for itself. Without
    `prompt_grammar` the config's caption grammar is left out (hashed as the config written without it): a system
    that prompts as written does not read it."""
    path = Path(model)
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        if file.name == CONFIG_NAME and not prompt_grammar:
            config = json.loads(file.read_text())
            if "prompt_grammar" in config:
                del config["prompt_grammar"]
                digest.update((json.dumps(config, indent=2) + "\n").encode())
                continue
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class SystemCache:
    """A system's summary, contact-sheet frames and per-clip readings (for bootstrap intervals), stored under a key
    of everything they depend on: the system, the checkpoint's bytes, the prompts, sizes and batch, the classifier.
    Re-running an evaluation after one model changed regenerates only the systems of that model."""

    def __init__(self, cfg: EvalConfig):
        self.root = Path(cfg.cache) if cfg.cache else None
        self.common = {
            "version": 2,  # 2: per-clip purity, noise draws
            "prompts": cfg.prompts,
            "draws": cfg.draws,
            "real_open": cfg.real_open,
            "seed": cfg.seed,
            "size": cfg.size,
            "seconds": cfg.seconds,
            "batch_size": cfg.batch_size,
            "sheet_prompts": cfg.sheet_prompts,
            "classifier": classifier_key(cfg),
            "device": cfg.device,
        }
        self.fingerprints: dict[tuple[str, bool], str] = {}

    def _path(self, system: SystemSpec) -> Path | None:
        if self.root is None:
            return None
        which = (system.model, system.complete_prompts)
        if which not in self.fingerprints:
            self.fingerprints[which] = model_fingerprint(*which)
        described = asdict(system)
        # defaults since before these fields existed: earlier results stay valid
        if described["prompt"] == "full":
            del described["prompt"]
        if not described["complete_prompts"]:
            del described["complete_prompts"]
        if described["kind"] == "generate":
            del described["kind"]
        for name, default in RUN_DEFAULTS.items():
            if described[name] == default:
                del described[name]
        key = {**self.common, "system": described, "model": self.fingerprints[which]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"{slug(system.name)}-{digest}"

    def load(self, system: SystemSpec) -> tuple[dict, np.ndarray, dict[str, np.ndarray] | None] | None:
        """The summary, the sheet frames and the per-clip readings; results stored before per-clip readings were
        kept give None for them (their intervals are not reported)."""
        path = self._path(system)
        if path is None or not path.with_suffix(".json").is_file() or not path.with_suffix(".npy").is_file():
            return None
        clips = None
        if path.with_suffix(".npz").is_file():
            with np.load(path.with_suffix(".npz")) as stored:
                clips = dict(stored)
        return json.loads(path.with_suffix(".json").read_text()), np.load(path.with_suffix(".npy")), clips

    def store(self, system: SystemSpec, summary: dict, sheet: np.ndarray, clips: dict[str, np.ndarray]) -> None:
        path = self._path(system)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".npy"), sheet)
        np.savez(path.with_suffix(".npz"), **clips)
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")

"""Shared fixtures: CPU threads, offline text encoder, and one tiny pipeline per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm():
    from aptserve.engines.loading import load_text_encoder
    from aptserve.engines.text import TextEncoderConfig

    return load_text_encoder(TextEncoderConfig())


@pytest.fixture(scope="session")
def tiny_pipeline(minilm):
    from aptserve.engines.loading import load_model
    from aptserve.engines.pipeline import Pipeline
    from aptserve.engines.text import CachedTextEncoder

    return Pipeline(load_model("tiny"), CachedTextEncoder(minilm))

import argparse

import pytest
from pydantic import ValidationError

from aptserve.server.settings import Settings, add_settings_arguments, settings_from_args


def test_every_setting_is_an_env_var_and_a_flag(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert set(Settings.model_fields) <= flags

    monkeypatch.setenv("APTSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("APTSERVE_API_KEYS", "a, b")
    args = parser.parse_args(["--port", "9001", "--no-warmup", "--data-dir", str(tmp_path)])
    settings = settings_from_args(args)
    assert (settings.port, settings.warmup, settings.data_dir) == (9001, False, tmp_path)
    assert (settings.max_queue, settings.api_keys) == (7, ["a", "b"])  # env fills what flags leave unset


def test_bad_settings_are_rejected():
    with pytest.raises(ValidationError):
        Settings(max_queue=0)
    with pytest.raises(ValidationError):
        Settings(no_such_setting=1)


def test_prompt_completion_setting_reaches_the_worker(tmp_path):
    from aptserve.server.app import build_services
    from tests.server.conftest import make_settings

    assert build_services(make_settings(tmp_path)).worker.complete_prompts
    args = argparse.ArgumentParser()
    add_settings_arguments(args)
    off = settings_from_args(
        args.parse_args(["--no-prompt-completion", "--model", "tiny", "--data-dir", str(tmp_path)])
    )
    assert not build_services(off).worker.complete_prompts

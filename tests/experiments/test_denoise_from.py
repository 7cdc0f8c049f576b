"""experiments/denoise_from.py: the cut schedule, and a two-clip run on the committed teacher. A research probe's
tests are slow: they run in `make test-all`, not in the default tier."""

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from aptserve.engines.sampling import timesteps

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "denoise_from.py"
pytestmark = pytest.mark.slow


def schedule_from(*args):
    spec = importlib.util.spec_from_file_location("denoise_from", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.schedule_from(*args)


def test_schedule_from_one_is_the_full_schedule_and_lower_t0_cuts_it():
    assert schedule_from(1.0, 25, 3.0) == [1.0, *timesteps(25, 3.0).tolist()[1:]]
    cut = schedule_from(0.5, 25, 3.0)
    assert cut[0] == 0.5 and cut[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(cut))
    assert len(cut) - 1 == sum(t < 0.5 for t in timesteps(25, 3.0).tolist())  # every interval below t0 is run


@pytest.mark.skipif(not (ROOT / "models/shapes-teacher-tiny").exists(), reason="needs the committed teacher")
def test_denoising_barely_noised_real_clips_keeps_their_colour():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "models/shapes-teacher-tiny", "--t0", "0.1", "--clips", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("| 0.1 |"))
    assert row.split("|")[3].strip() == "100.0%", out  # colour survives the VAE and one step from t0 = 0.1

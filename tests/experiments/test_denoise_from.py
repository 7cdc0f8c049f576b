"""bench/denoise_from.py: the cut schedule, and a two-clip run on the committed teacher."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from denoise_from import schedule_from  # noqa: E402

from aptserve.engines.sampling import timesteps  # noqa: E402


def test_schedule_from_one_is_the_full_schedule_and_lower_t0_cuts_it():
    assert schedule_from(1.0, 25, 3.0) == [1.0, *timesteps(25, 3.0).tolist()[1:]]
    cut = schedule_from(0.5, 25, 3.0)
    assert cut[0] == 0.5 and cut[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(cut))
    assert len(cut) - 1 == sum(t < 0.5 for t in timesteps(25, 3.0).tolist())  # every interval below t0 is run


@pytest.mark.skipif(not (ROOT / "models/shapes-teacher-tiny").exists(), reason="needs the committed teacher")
def test_denoising_barely_noised_real_clips_keeps_their_colour():
    out = subprocess.run(
        [sys.executable, "bench/denoise_from.py", "models/shapes-teacher-tiny", "--t0", "0.1", "--clips", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("| 0.1 |"))
    assert row.split("|")[3].strip() == "100.0%", out  # colour survives the VAE and one step from t0 = 0.1

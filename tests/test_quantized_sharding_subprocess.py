"""Runs tests/sharding/test_quantized_sharding.py in a pytest process with 8 simulated CPU devices.

(``tests/test_sharding_subprocess.py`` runs the whole of tests/sharding, this file included;
this runner lets the low-bit checks be run on their own.)
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quantized_sharding_passes_on_8_simulated_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/sharding/test_quantized_sharding.py", "-q",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout, report

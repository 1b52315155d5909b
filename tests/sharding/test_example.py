"""Smoke test of examples/sharded_training.py on the 8 simulated devices."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from flax import nnx

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sharded_training.py"


def load():
    spec = importlib.util.spec_from_file_location("sharded_training", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sharded_training"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(nnx, "as_pure"), reason="the example uses nnx.as_pure (flax >= 0.12.7)")
def test_sharded_training_example(capsys):
    result = load().main(["--steps", "6", "--hidden", "64", "--batch", "64"])
    out = capsys.readouterr().out
    assert result["devices"] == 8 and result["mesh"] == {"data": 4, "model": 2}
    assert "mesh: {'data': 4, 'model': 2}" in out
    # Centred RMSprop with momentum: mu, nu and the momentum buffer for each of 6 parameters.
    assert result["mirrored"] == 18
    state_specs = {spec for _, shape, spec, _ in result["state_placement"] if shape}
    assert state_specs == {spec for _, _, spec, _ in result["param_placement"]}
    assert all(devices == 8 for *_, devices in result["state_placement"])
    assert result["collectives"] == 0
    assert "collectives in the compiled optimizer update: 0" in out
    assert result["placement_unchanged"]
    assert result["losses"][-1] < result["losses"][0]


def test_flag_is_left_alone_when_an_accelerator_is_requested(monkeypatch):
    module = sys.modules.get("sharded_training") or load()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not module.simulate_cpu_devices(8)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert module.simulate_cpu_devices(4)
    assert "--xla_force_host_platform_device_count=4" in module.os.environ["XLA_FLAGS"]
    assert not module.simulate_cpu_devices(8)  # already chosen: kept

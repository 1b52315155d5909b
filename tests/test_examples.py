"""Smoke tests of the scripts in examples/: each runs a few steps and writes its figure."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import matplotlib
import pytest

# Each smoke test runs an example script for a few steps: minutes in all, so `slow`.
pytestmark = pytest.mark.slow

matplotlib.use("Agg")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The examples train small models end to end: the slow part of the suite (-m "not slow" skips it).
pytestmark = pytest.mark.slow


def load(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def check_png(path: str, folder: Path) -> None:
    figure = Path(path)
    assert figure.parent == folder
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 5_000


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam", "adagrad", "sgd"])
def test_train_digits(optimizer, tmp_path, capsys):
    result = load("train_digits").main(
        ["--optimizer", optimizer, "--steps", "20", "--hidden", "16", "--no-progress",
         "--out", str(tmp_path)]
    )
    check_png(result["figure"], tmp_path)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy: [01]\.\d\d", last_line)
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_train_digits_learns_quickly(tmp_path):
    result = load("train_digits").main(["--steps", "150", "--no-progress", "--out", str(tmp_path)])
    assert result["test_accuracy"] > 0.85  # 0.92 after 150 steps with seed 0


def test_quadratic_2d_reproduces_d2l(tmp_path, capsys):
    result = load("quadratic_2d").main(["--out", str(tmp_path)])
    check_png(result["figure"], tmp_path)
    x1, x2 = result["rmsprop_point"]
    assert abs(x1 - (-0.010599)) < 5e-7  # d2l: epoch 20, x1: -0.010599, x2: 0.000000
    assert abs(x2) < 5e-7
    assert "x1: -0.010599, x2: 0.000000" in capsys.readouterr().out


def test_leaky_average_weights(tmp_path):
    result = load("leaky_average_weights").main(["--steps", "12", "--out", str(tmp_path)])
    check_png(result["figure"], tmp_path)
    for gamma, row in result["table"].items():
        assert row["window"] == pytest.approx(1 / (1 - gamma))
        assert row["max_error"] < 1e-6  # rmsjax.leaky_average matches (1 - gamma) * gamma**t


def test_adagrad_stall(tmp_path):
    result = load("adagrad_stall").main(["--steps", "200", "--out", str(tmp_path)])
    check_png(result["figure"], tmp_path)
    assert result["AdaGrad"]["final_eff_median"] < result["RMSprop"]["final_eff_median"]
    assert result["AdaGrad"]["final_distance"] > result["RMSprop"]["final_distance"]


def test_rnn_sequence(tmp_path):
    result = load("rnn_sequence").main(
        ["--steps", "3", "--length", "6", "--hidden", "4", "--batch-size", "8", "--no-progress",
         "--out", str(tmp_path)]
    )
    check_png(result["figure"], tmp_path)
    assert len(result["test_mse"]) == 3


def test_nonstationary(tmp_path):
    result = load("nonstationary").main(["--steps", "400", "--out", str(tmp_path)])
    check_png(result["figure"], tmp_path)
    summary = result["summary"]
    # After the loss scale drops, RMSprop's effective learning rate rises; SGD's cannot.
    assert summary["RMSprop"]["eff_lr_after"] > 3 * summary["RMSprop"]["eff_lr_before"]
    assert summary["SGD"]["eff_lr_after"] == pytest.approx(summary["SGD"]["eff_lr_before"])


def test_low_bit_state(tmp_path):
    result = load("low_bit_state").main(["--tasks", "classifier", "quadratic", "--steps-scale", "0.01",
                                         "--out", str(tmp_path)])
    check_png(result["figure"], tmp_path)
    for per in result["results"].values():
        assert set(per) == {"float32", "8-bit", "4-bit"}
        assert all(r["final_loss"] == r["final_loss"] < float("inf") for r in per.values())


def test_port_from_pytorch_without_torch(tmp_path, capsys):
    out = tmp_path / "port.png"
    result = load("port_from_pytorch").main(["--epochs", "2", "--no-torch", "--out", str(out)])
    check_png(result["figure"], tmp_path)
    assert not result["torch_used"]
    assert "comparison with PyTorch needs torch" in capsys.readouterr().out
    assert result["rmsjax"].shape == (result["steps"],)
    assert result["rmsjax"][-1] < result["rmsjax"][0]  # it trains


def test_port_from_pytorch_against_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    result = load("port_from_pytorch").main(["--epochs", "2", "--nudges", "2", "--out", str(tmp_path)])
    check_png(result["figure"], tmp_path)
    assert result["torch_used"]
    assert result["lr_gap"] == 0.0  # the schedule is PyTorch's, rate for rate
    floor = max(result["max_floor"], result["max_own_floor"])
    assert 0 < floor < 1e-4
    assert result["max_gap"] <= 4 * floor  # one-ulp noise, not a different recipe
    assert result["max_control_gap"] > 100 * floor  # optax's conventions part visibly
    assert "max |rmsjax - PyTorch| loss gap" in capsys.readouterr().out

"""Checkpoints: a training state saved half-way and restored in a new process resumes exactly.

For every optimizer (``reliability_cases.CHECKPOINTED``: all of layers 3 and 4, plus a
bfloat16 state, ``apply_if_finite`` and ``inject_hyperparams``), the parameters and
optimizer state after ``HALF`` of ``TOTAL_STEPS`` steps are written with Flax's
serialization; a fresh Python process (``tests/checkpoint_resume.py``) restores them into a
freshly initialised structure and trains the rest. Its final parameters and state must
equal, bit for bit, those of the uninterrupted run in this process.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest
from checkpoint_resume import HALF, TOTAL_STEPS, fresh, restore, save, train
from reliability_cases import CHECKPOINTED, assert_bitwise_equal

# Resuming checkpoints in a fresh Python process for every optimizer: `slow`.
pytestmark = pytest.mark.slow

NAMES = sorted(CHECKPOINTED)
HELPER = pathlib.Path(__file__).resolve().parent / "checkpoint_resume.py"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """{name: (uninterrupted final state, template)} after the new process has resumed all."""
    directory = tmp_path_factory.mktemp("checkpoints")
    uninterrupted = {}
    for name in NAMES:
        tx, state = fresh(name)
        half = train(tx, state, HALF)
        save(directory / f"{name}.msgpack", half)
        uninterrupted[name] = (train(tx, half, TOTAL_STEPS), fresh(name)[1])
    # The child inherits this process's environment, so it picks the same JAX backend.
    result = subprocess.run(
        [sys.executable, str(HELPER), str(directory)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ), check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed {len(NAMES)} checkpoints" in result.stdout, result.stdout
    return directory, uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_resume_in_a_new_process_is_bit_for_bit(resumed, name):
    directory, uninterrupted = resumed
    expected, template = uninterrupted[name]
    actual = restore(directory / f"{name}.final", template)
    assert int(actual["step"]) == TOTAL_STEPS
    assert_bitwise_equal(actual["params"], expected["params"])
    assert_bitwise_equal(actual["opt_state"], expected["opt_state"])


def test_restore_keeps_structure_and_dtypes(tmp_path):
    tx, state = fresh("rmsprop_bfloat16_state")
    state = train(tx, state, 2)
    save(tmp_path / "state.msgpack", state)
    restored = restore(tmp_path / "state.msgpack", fresh("rmsprop_bfloat16_state")[1])
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_bitwise_equal(restored, state)
    # The chain's parts come back as their own state classes (found by type, not by index).
    assert [type(part).__name__ for part in restored["opt_state"]].count("ScaleByStddevState") == 1

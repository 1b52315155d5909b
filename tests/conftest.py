"""Test configuration: strict dtype promotion everywhere, warnings as errors.

Strict promotion makes any implicit mixing of dtypes (a float32 hyperparameter meeting a
bfloat16 leaf, a float64 constant meeting float32) fail loudly, so the dtype rules of
rmsjax.averages are enforced by every test. Warnings are turned into errors in
pyproject.toml ([tool.pytest.ini_options] filterwarnings), with each exception named there.
"""

import os
import sys

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

# The tests import their helper modules (numpy_reference, reliability_cases, ...) by name.
# pytest runs with --import-mode=importlib (pyproject.toml), which leaves sys.path alone
# so that an installed rmsjax, not the source tree, is what the tests and doctests import;
# this folder is therefore put on the path here, for the helpers only.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

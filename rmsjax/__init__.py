"""rmsjax: composable, pure gradient transformations of the RMSprop family for JAX.

Every public factory returns an ``optax.GradientTransformation``. Layers, bottom to top:

* :mod:`rmsjax.averages`: leaky averages, running sums and bias correction on pytrees;
* :mod:`rmsjax.transforms`: ``scale_by_rms``, ``scale_by_stddev``, ``scale_by_rss``,
  ``scale_by_adam``, ``scale_by_adadelta``, ``leaky_average``, ``momentum``;
* :mod:`rmsjax.optimizers`: ``rmsprop``, ``adagrad``, ``adam``, ``adamw``, ``adadelta``,
  ``sgd``, each a chain of transformations plus the learning-rate step.
"""

from rmsjax import averages, compat, transforms
from rmsjax._low_precision import low_precision
from rmsjax._quantization import is_quantized, quantized
from rmsjax._zero import zero_shardings
from rmsjax.diagnostics import EffectiveLearningRate, effective_learning_rate, learning_rate, step_count
from rmsjax.fusion import one_pass
from rmsjax.optimizers import adadelta, adagrad, adam, adamw, rmsprop, sgd
from rmsjax.packing import packed
from rmsjax.transforms import (
    leaky_average,
    momentum,
    scale_by_adadelta,
    scale_by_adam,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
)

__version__ = "0.3.0"

__all__ = [
    "EffectiveLearningRate",
    "adadelta",
    "adagrad",
    "adam",
    "adamw",
    "averages",
    "compat",
    "effective_learning_rate",
    "is_quantized",
    "leaky_average",
    "learning_rate",
    "low_precision",
    "momentum",
    "one_pass",
    "packed",
    "quantized",
    "rmsprop",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_stddev",
    "sgd",
    "step_count",
    "transforms",
    "zero_shardings",
]

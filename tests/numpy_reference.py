"""Independent NumPy references for every rmsjax optimizer and transformation.

Written from the published update rules (the papers cited in each docstring of rmsjax and
Dive into Deep Learning, chapter 12), leaf by leaf in float64, sharing no code with
rmsjax. Each reference is a class with ``init(params)`` and ``step(grads, params)``
returning the *update* to add to the parameters, so the test can drive it exactly like
an ``optax.GradientTransformation``.

The test problem: a two-leaf tree whose gradient depends on the parameters,
``g = c * p + 0.5 * sin(3 p)`` with a fixed positive ``c`` per leaf.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# ---------------------------------------------------------------- the problem

INITIAL_PARAMS = {
    "a": np.array([1.5, -0.7, 0.3]),
    "b": np.array([[-1.2, 0.4], [2.0, -0.05]]),
}
CURVATURE = {
    "a": np.array([1.0, 3.0, 0.5]),
    "b": np.array([[2.0, 0.2], [1.0, 4.0]]),
}


def gradient(params, xp=np):
    """The gradient of the test problem, in NumPy (``xp=np``) or jax.numpy."""
    return {
        key: xp.asarray(CURVATURE[key], dtype=value.dtype) * value + 0.5 * xp.sin(3.0 * value)
        for key, value in params.items()
    }


# ---------------------------------------------------------------- references


class Reference:
    """Base: keeps per-leaf state dicts and the step number ``t`` (from 1)."""

    def init(self, params):
        self.t = 0
        self.state = {key: self.init_leaf(value) for key, value in params.items()}

    def step(self, grads, params):
        self.t += 1
        return {key: self.step_leaf(grads[key], params[key], self.state[key], key) for key in grads}


@dataclasses.dataclass
class RMSprop(Reference):
    """Tieleman & Hinton; centred form of Graves 2013; PyTorch-style momentum and L2."""

    lr: float
    decay: float = 0.9
    eps: float = 1e-8
    centered: bool = False
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    bias_correction: bool = False
    eps_in_sqrt: bool = False
    initial_scale: float = 0.0

    def init_leaf(self, p):
        return {"v": np.full_like(p, self.initial_scale), "m": np.zeros_like(p), "b": np.zeros_like(p)}

    def step_leaf(self, g, p, s, key):
        g = g + self.weight_decay * p
        s["v"] = self.decay * s["v"] + (1 - self.decay) * g * g
        s["m"] = self.decay * s["m"] + (1 - self.decay) * g
        v, m = s["v"], s["m"]
        if self.bias_correction:
            v = v / (1 - self.decay ** self.t)
            m = m / (1 - self.decay ** self.t)
        if self.centered:
            v = v - m * m
        if self.eps_in_sqrt:
            scaled = g / np.sqrt(v + self.eps)
        else:
            scaled = g / (np.sqrt(v) + self.eps)
        if self.momentum:
            s["b"] = self.momentum * s["b"] + scaled
            scaled = scaled + self.momentum * s["b"] if self.nesterov else s["b"]
        return -self.lr * scaled


@dataclasses.dataclass
class Adagrad(Reference):
    """Duchi, Hazan & Singer 2011, with eps outside (or inside) the root."""

    lr: float
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    eps_in_sqrt: bool = False

    def init_leaf(self, p):
        return {"G": np.full_like(p, self.initial_accumulator_value)}

    def step_leaf(self, g, p, s, key):
        s["G"] = s["G"] + g * g
        if self.eps_in_sqrt:
            return -self.lr * g / np.sqrt(s["G"] + self.eps)
        return -self.lr * g / (np.sqrt(s["G"]) + self.eps)


@dataclasses.dataclass
class Adam(Reference):
    """Kingma & Ba 2015; NAdam as in Dozat 2016; AdamW as in Loshchilov & Hutter 2019."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_keys: set | None = None

    def init_leaf(self, p):
        return {"m": np.zeros_like(p), "v": np.zeros_like(p)}

    def step_leaf(self, g, p, s, key):
        t, b1, b2 = self.t, self.b1, self.b2
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        if self.nesterov:
            m_hat = b1 * s["m"] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
        else:
            m_hat = s["m"] / (1 - b1 ** t)
        v_hat = s["v"] / (1 - b2 ** t)
        direction = m_hat / (np.sqrt(v_hat + self.eps_root) + self.eps)
        if self.weight_decay and (self.decay_keys is None or key in self.decay_keys):
            direction = direction + self.weight_decay * p
        return -self.lr * direction


@dataclasses.dataclass
class Adadelta(Reference):
    """Zeiler 2012 (Algorithm 1), scaled by a learning rate, with optional L2."""

    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 0.0

    def init_leaf(self, p):
        return {"Eg2": np.zeros_like(p), "Edx2": np.zeros_like(p)}

    def step_leaf(self, g, p, s, key):
        g = g + self.weight_decay * p
        s["Eg2"] = self.rho * s["Eg2"] + (1 - self.rho) * g * g
        dx = np.sqrt(s["Edx2"] + self.eps) / np.sqrt(s["Eg2"] + self.eps) * g
        s["Edx2"] = self.rho * s["Edx2"] + (1 - self.rho) * dx * dx
        return -self.lr * dx


@dataclasses.dataclass
class SGD(Reference):
    """Gradient descent with heavy-ball (Polyak) or Nesterov (Sutskever 2013) momentum."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0

    def init_leaf(self, p):
        return {"b": np.zeros_like(p)}

    def step_leaf(self, g, p, s, key):
        if not self.momentum:
            return -self.lr * g
        if self.t == 1:
            s["b"] = g.copy()
        else:
            s["b"] = self.momentum * s["b"] + (1 - self.dampening) * g
        direction = g + self.momentum * s["b"] if self.nesterov else s["b"]
        return -self.lr * direction


@dataclasses.dataclass
class LeakyAverage(Reference):
    """The leaky average of d2l 12.6, optionally divided by 1 - decay**t."""

    decay: float
    debias: bool = False

    def init_leaf(self, p):
        return {"m": np.zeros_like(p)}

    def step_leaf(self, g, p, s, key):
        s["m"] = self.decay * s["m"] + (1 - self.decay) * g
        return s["m"] / (1 - self.decay ** self.t) if self.debias else s["m"]


@dataclasses.dataclass
class DecayedWeights(Reference):
    """L2 weight decay as a direction: ``g + weight_decay * p`` (on ``decay_keys`` only, if given)."""

    weight_decay: float
    decay_keys: set | None = None

    def init_leaf(self, p):
        return {}

    def step_leaf(self, g, p, s, key):
        if self.decay_keys is None or key in self.decay_keys:
            return g + self.weight_decay * p
        return g


@dataclasses.dataclass
class Negated(Reference):
    """A layer-2 transformation's raw output, negated and scaled by ``lr`` for a descent path."""

    inner: Reference
    lr: float

    def init(self, params):
        self.inner.init(params)

    def step(self, grads, params):
        raw = self.inner.step(grads, params)
        return {key: -self.lr * value for key, value in raw.items()}


def run(reference, steps, params=None):
    """The parameter trajectory of ``reference`` on the test problem: a list of trees."""
    params = {k: v.copy() for k, v in (params or INITIAL_PARAMS).items()}
    reference.init(params)
    path = []
    for _ in range(steps):
        update = reference.step(gradient(params), params)
        params = {k: params[k] + update[k] for k in params}
        path.append(params)
    return path

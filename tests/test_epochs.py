"""The host-fed epoch runner: the carry threads through every batch in order and the metric means are exact."""

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import diagnostics, epochs
from modkd_jax.epochs import run_epoch


@jax.jit
def _step(w, x, y):
    """One SGD step of least squares; metrics: the loss and a per-'agent' vector."""
    loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    return w - 0.1 * g, {"loss": loss, "per_agent": jnp.stack([loss, 2 * loss])}


def test_run_epoch_is_the_plain_loop_with_means_fetched_once(monkeypatch):
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32)) for _ in range(5)]
    w, losses = jnp.zeros(3), []
    for x, y in batches:
        w, m = _step(w, x, y)
        losses.append(float(m["loss"]))
    fetched = []

    def to_host(x):  # the runner's fetch, counted (XLA:CPU's transfer guard does not see host reads)
        fetched.append(x)
        return np.asarray(x)

    monkeypatch.setattr(epochs.parallel, "to_host", to_host)
    got, means, steps = run_epoch(_step, jnp.zeros(3), iter(batches))
    assert len(fetched) == 2  # once per metric, at the end of the epoch, not per step
    fetched.clear()
    again, none, _ = run_epoch(_step, jnp.zeros(3), iter(batches), metrics=False)
    assert none == {} and not fetched  # metrics off: nothing summed, nothing fetched
    np.testing.assert_array_equal(np.asarray(again), np.asarray(w))
    assert steps == 5
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w))  # same steps, same order
    assert means["loss"].dtype == np.float64 and means["per_agent"].shape == (2,)
    np.testing.assert_allclose(means["loss"], np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(means["per_agent"], [np.mean(losses), 2 * np.mean(losses)], rtol=1e-6)
    before = diagnostics.backend_compiles()
    run_epoch(_step, got, iter(batches))  # a second epoch compiles nothing (the sums are added on the device)
    assert diagnostics.backend_compiles() == before


def test_an_empty_epoch_keeps_the_carry_and_has_no_means():
    w = jnp.ones(3)
    got, means, steps = run_epoch(_step, w, iter(()))
    assert got is w and means == {} and steps == 0

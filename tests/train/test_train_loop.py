"""The training loop never waits on the host between fetches: no implicit transfer while steps are dispatched, and
one fetch of the metrics every ``log_every`` steps (plus one at the end of each task)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.train import runner
from clsvd_jax.train import step as step_lib
from clsvd_jax.train.phases import train_task


def test_the_guard_catches_an_implicit_transfer():
  # The control: on this backend, the guard the next test installs does raise on a host <-> device round trip.
  x = jnp.ones(())
  with jax.transfer_guard("disallow"):
    with pytest.raises(Exception, match="[Dd]isallowed"):
      float(x + 1)
    with pytest.raises(Exception, match="[Dd]isallowed"):
      jnp.add(x, np.float32(1.0))


def test_steps_between_fetches_make_no_host_transfer(tmp_path, monkeypatch):
  monkeypatch.setattr(train_task, "between_fetches", lambda: jax.transfer_guard("disallow"))
  fetched = []
  real_fetch = train_task.fetch

  def counting_fetch(tree):
    host = real_fetch(tree)
    fetched.append(len(host[0]["loss"]))
    return host

  monkeypatch.setattr(train_task, "fetch", counting_fetch)
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), method="seqft",
                       training={"steps_per_task": 7, "log_every": 3})
  d["eval"]["initial"] = False
  res = runner.run(C.from_dict(d), echo=None)
  # Per task: fetches after steps 3 and 6 (log_every) and 7 (the end): every step's metrics, in 3 transfers.
  assert fetched == [3, 3, 1, 3, 3, 1]
  assert res["global_steps"] == 14 and all(np.isfinite(res["train_loss"]))


def test_a_non_finite_step_between_fetches_is_named_at_the_next_fetch(tmp_path, monkeypatch):
  # NaN learning rate at step 2 of 5 (0-based 1), metrics fetched after step 4: the fetch names step 2, with its
  # non-finite update, and nothing was saved (checkpoint_every 0, first task).
  real_schedule = step_lib.lr_schedule
  monkeypatch.setattr(step_lib, "lr_schedule",
                      lambda s: (lambda count: jnp.where(count == 1, jnp.nan, real_schedule(s)(count))))
  d = tiny_config_dict(tmp_path, tasks=("low",), method="seqft", training={"steps_per_task": 5, "log_every": 4})
  d["eval"]["initial"] = False
  with pytest.raises(runner.TrainingError, match=r"update norm \(nan\) at step 2 of task 1 \(low\), global step 2;"
                                                 r".*no checkpoint was written yet"):
    runner.run(C.from_dict(d), echo=None)


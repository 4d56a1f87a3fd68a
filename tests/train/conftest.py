"""Fixtures of the runner tests."""

import pytest
from _train_helpers import tiny_config_dict


@pytest.fixture
def tiny_config(tmp_path):
  return lambda **kw: tiny_config_dict(tmp_path, **kw)

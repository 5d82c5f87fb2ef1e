"""Test session set-up: 8 simulated CPU devices before JAX initialises."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long end-to-end tests (run by default in CI)')


@pytest.fixture
def one_torch_thread():
  """Two torch threads on a loaded 2-core machine run ~10x slower than one."""
  import torch  # pylint: disable=import-outside-toplevel  (only tests that use it pay for it)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)

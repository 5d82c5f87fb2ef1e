"""Test session set-up: 8 simulated CPU devices before JAX initialises."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long end-to-end tests (run by default in CI)')

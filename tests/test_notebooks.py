"""Every notebook in ``colab/`` runs top to bottom on CPU with the small switch (nbclient), and
is kept in git without outputs."""

import pathlib

import nbformat
from nbclient import NotebookClient
import pytest

COLAB = pathlib.Path(__file__).resolve().parents[1] / 'colab'
NOTEBOOKS = sorted(COLAB.glob('*.ipynb'))


def test_there_are_notebooks():
  assert NOTEBOOKS, f'no notebooks in {COLAB}'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (path.name, cell.source[:60])


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu_with_small_sizes(path, tmp_path, monkeypatch):
  # the kernel inherits this environment: one CPU device, as a laptop or a CPU Colab has
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('VITREG_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('VITREG_NOTEBOOK_OUT', str(tmp_path))
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error (or assert)

"""Every notebook in notebooks/ runs top to bottom, headless, with its smoke settings."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("FTJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("FTJAX_NOTEBOOK_MODEL", tiny_model)  # notebooks may use it to stay tiny
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors

"""Every notebook in notebooks/ runs top to bottom on the embedded demo model."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    shutil.copy(path, tmp_path / path.name)
    nb = nbformat.read(tmp_path / path.name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "quickstart-winner" / "adapter_model.safetensors").exists() or path.stem != "quickstart"
    panels = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]
    panels = [o for o in panels if "application/vnd.jupyter.widget-view+json" in o.data]
    assert panels, "the notebook shows no panel"
    final = panels[-1].data["text/html"]  # what GitHub / nbconvert show: the finished curves and the run table
    assert "<svg" in final and final.count("<polyline") >= 4 and "finished" in final

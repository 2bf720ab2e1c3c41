"""The quick-start notebook runs top to bottom on CPU (a tiny random model), so it cannot rot."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    # Run in a scratch copy of the layout the notebook expects (configs and test assets at the root), so that
    # its checkpoints and run go to tmp_path.
    for name in ("configs", "tests"):
        os.symlink(os.path.abspath(os.path.join(ROOT, name)), tmp_path / name)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    images = [
        o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if "image/png" in o.get("data", {})
    ]
    assert len(images) == 4  # two aspect ratios, the scale-by-scale strip, the fine-tuned sample
    text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "h/w 1.0: 1.0@0.06M, 7 scales, 256x256 pixels" in text and "h/w 0.5: 0.5@0.06M" in text
    assert "loss by step: [(10," in text and (tmp_path / "runs" / "notebook" / "samples" / "sample_000.png").exists()

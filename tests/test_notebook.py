"""examples/quickstart.ipynb runs top to bottom (on a tiny random checkpoint it builds itself, and removes)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", ROOT)
    monkeypatch.delenv("GEMMA4_MODEL", raising=False)
    scratch = tmp_path / "tmp"  # the kernel's temporary files: the tiny checkpoint must not outlive it
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "parameters" in outputs and "(1, " in outputs
    left = [p.name for p in scratch.iterdir() if p.name.startswith("gemma4-tiny-")]  # (torch keeps its caches)
    assert not left, left

"""The README's Python API block runs as written (in a fresh directory, as a notebook would)."""

import re
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_api_block_runs(smollm2_dir, tmp_path, monkeypatch, capsys):
    block = re.search(r"<!-- python-api -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md (Python API)", "exec"), namespace)
    summary, result, reply = namespace["summary"], namespace["result"], namespace["reply"]
    assert summary["steps"] == 2 and (tmp_path / "runs" / "notebook" / "adapter" / "adapter_config.json").is_file()
    assert np.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert isinstance(reply, str) and reply.strip()
    assert 1 < result["perplexity"] < 1e4 and result["sequences"] == 1 and result["tokens"] > 10

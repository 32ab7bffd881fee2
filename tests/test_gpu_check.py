"""The GPU proof script, rehearsed on the CPU: every step runs (Pallas interpreted, tiny shapes) and reports values.

On the GPU machine the same script runs the same scripts with GPU shapes (``scripts/gpu_check.sh``).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _rows(text: str) -> list[list[str]]:
    """Table rows of a markdown report, without the header and separator rows."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0] not in ("variant", "layer (N x K)", "arguments")]


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_every_step_and_reports_values(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--rehearse"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "every step passed" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "1_kernels_check.md", "2_memory.md", "3_compiled_memory.md", "4_train_step.md", "5_kernels_bench.md",
        "6_decode.md", "env.md", "gpu_check.log"]
    assert re.search(r"jax 0\.\d+\.\d+: \d+ names used by our code, 0 problems", (tmp_path / "env.md").read_text())

    checks = (tmp_path / "1_kernels_check.md").read_text()
    # 3 cases (nf4, fp4, int4) x 2 dtypes x 2 kernels, each compared with its reference
    assert checks.count("(ok)") == 12 and "FAIL" not in checks
    assert {"split-K decode", "transposed"} <= set(re.findall(r"^- (split-K decode|transposed|forward)", checks, re.M))

    timings = _rows((tmp_path / "5_kernels_bench.md").read_text())
    assert [(r[0], r[1]) for r in timings] == [("tiny (48 x 192)", "1"), ("tiny (48 x 192)", "16"),
                                              ("tiny (48 x 192)", "16")]
    assert all(float(r[2]) > 0 and float(r[6]) > 0 and float(r[10]) > 0 for r in timings)

    steps = {r[0]: r for r in _rows((tmp_path / "4_train_step.md").read_text())}
    assert list(steps) == ["16-bit LoRA (bf16 base)", "QLoRA nf4+dq, xla kernel"]
    assert all(float(r[1]) > 0 and 4 < float(r[5]) < 8 for r in steps.values())  # loss near ln(512) = 6.24

    memory = (tmp_path / "2_memory.md").read_text()
    assert "LoRA r=16 on all" in memory and "LoRA r=8 on all" in memory  # both models, each at its rank
    header = "| arguments | temporaries | outputs | aliased | compiled peak | measured peak | formula |"
    assert memory.count(header) == 2
    for table in memory.split(header)[1:]:
        cells = table.splitlines()[2].strip("| ").split(" | ")
        values = dict(zip(header.strip("| ").split(" | "), cells, strict=True))
        assert float(values["compiled peak"]) > float(values["arguments"]) > 0
        assert values["measured peak"] == "n/a"  # the CPU backend keeps no allocator statistics
        assert float(values["formula"]) > 0

    compiled = (tmp_path / "3_compiled_memory.md").read_text()
    for run in ("none --lora-dtype float32", "host --lora-dtype float32", "none --lora-dtype bfloat16"):
        assert f"--offload {run} --compiled" in compiled
    assert "LoRA r=8 (bfloat16)" in compiled
    peaks = re.findall(r"^  peak +([\d.]+) GiB +formula +([\d.]+) GiB", compiled, re.M)
    assert len(peaks) == 3 and all(float(v) > 0 for pair in peaks for v in pair)

    decode = _rows((tmp_path / "6_decode.md").read_text())
    assert [(r[0], r[2]) for r in decode] == [("nf4", "1"), ("nf4", "8"), ("bf16", "1"), ("bf16", "8")]
    assert all(float(r[3]) > 0 for r in decode)

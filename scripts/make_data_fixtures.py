"""Write a tiny Alpaca-style dataset with the real Hugging Face ``datasets`` library (save_to_disk).

    pip install datasets && python scripts/make_data_fixtures.py

Writes ``tests/fixtures/hf_disk_alpaca/`` (Arrow stream file + state.json + dataset_info.json)
and the same records as ``tests/fixtures/alpaca_small.jsonl``, so tests can check that the
``hf_disk`` and ``tfds`` sources read exactly what the plain file holds.
"""

import json
import shutil
from pathlib import Path

import datasets

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main() -> None:
    rows = [{"instruction": f"Add {a} and {b}.", "input": "" if a % 2 else f"{a}, {b}", "output": f"{a + b}"}
            for a in range(6) for b in range(4)]
    target = OUT / "hf_disk_alpaca"
    if target.exists():
        shutil.rmtree(target)
    datasets.Dataset.from_list(rows).save_to_disk(str(target))
    (OUT / "alpaca_small.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print(f"wrote {target} and alpaca_small.jsonl with datasets {datasets.__version__}")


if __name__ == "__main__":
    main()

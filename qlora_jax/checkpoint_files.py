"""Find and open the weight files of a Hugging Face model directory, safely.

Only safetensors is read: a single ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``,
``*.ckpt``) are refused, since unpickling runs code. Shard names from an index must
stay inside the model directory; the files themselves may be symlinks, as in a Hugging
Face cache snapshot, whose files link into the repo's ``blobs/``.
"""

import json
import os
from pathlib import Path

import numpy as np

from .safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = ("convert it once with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                ".save_pretrained(OUT, safe_serialization=True)")


def _inside(directory: Path, name: str, source: Path) -> Path:
    """``directory / name`` if ``name`` names a file inside ``directory`` (judged on the name, not on links)."""
    candidate = Path(os.path.normpath(directory.absolute() / name))
    if directory.absolute() not in candidate.parents:
        raise ValueError(f"{source}: shard path {name!r} points outside {directory}")
    return candidate


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files that hold the model's weights, in a stable order."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({err})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object of tensor -> file")
        shards = sorted({_inside(directory, str(name), index) for name in weight_map.values()})
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return shards
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{directory} holds only pickle checkpoints {pickles}; qlora_jax never unpickles "
                         f"(it can run arbitrary code). {CONVERT_HINT}")
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json "
                            f"(found: {present})")


class CheckpointReader:
    """All tensors of a model directory by name, read one at a time from memory-mapped shards."""

    def __init__(self, directory: Path):
        self.files = [SafetensorsFile(path) for path in weight_files(directory)]
        self.location: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.keys():
                self.location[name] = f

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.close()

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return self.location[name].get(name)

"""``python -m qlora_jax.convert --gguf FILE --out DIR``: a GGUF (llama architecture) to a Hugging Face directory."""

import argparse
import sys
from pathlib import Path

from .gguf_import import convert_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.convert", description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True, help="input .gguf file (llama architecture)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    args = parser.parse_args(argv)
    try:
        out = convert_gguf(args.gguf, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plain English prose for the data-type table: the opening of *Botchan* (Project Gutenberg #8868).

    python scripts/make_prose_fixture.py

The text ships in the sentencepiece 0.2.3 source distribution on PyPI (``test/botchan.txt``, the
corpus SentencePiece's own tests train on); Project Gutenberg texts may be copied and re-used
without restriction. This script downloads that sdist with pip (the registry is all it needs),
and writes the first ``CHARACTERS`` characters from "CHAPTER I" on, cut at a line end, to
tests/fixtures/prose/botchan.txt. ``scripts/reproduce_paper.py`` scores 6 windows of 256 tokens of it.
"""

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "sentencepiece==0.2.3"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
CHARACTERS = 12000
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "prose" / "botchan.txt"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--dest", tmp,
                        SDIST], check=True, capture_output=True)
        with tarfile.open(next(Path(tmp).glob("sentencepiece-*.tar.gz"))) as archive:
            text = archive.extractfile(MEMBER).read().decode("utf-8-sig").replace("\r\n", "\n")
    story = text[text.index("CHAPTER I\n"):]
    excerpt = story[: story.index("\n", CHARACTERS) + 1]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(excerpt)
    print(f"wrote {OUT} ({len(excerpt)} characters)")


if __name__ == "__main__":
    main()

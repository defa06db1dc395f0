"""Derive CLIP's vocab.json / merges.txt from the BPE table that OpenAI CLIP ships.

CLIP (Radford et al., 2021) tokenises with a byte-level BPE whose merge list is
`bpe_simple_vocab_16e6.txt.gz`; public packages such as `open_clip_torch` carry it. The
vocabulary is, in order: the 256 byte symbols, the same with `</w>`, one token per merge
(the first 48,894 merges), then `<|startoftext|>` and `<|endoftext|>`: 49,408 tokens, the
layout `transformers.CLIPTokenizer` reads.

Usage: python models/clip_tokenizer/derive_vocab.py [bpe_simple_vocab_16e6.txt.gz]
(without an argument it takes the file out of the `open_clip_torch` wheel from PyPI).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps this many merges
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map, which CLIP's BPE runs over."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def fetch_bpe_from_wheel(workdir: Path) -> bytes:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir),
         "open_clip_torch"],
        check=True,
    )
    wheel = next(workdir.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(BPE_MEMBER)


def derive(bpe_gz: bytes, out_dir: Path) -> None:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    (out_dir / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), "utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", "utf-8"
    )


def main() -> None:
    if len(sys.argv) > 1:
        bpe = Path(sys.argv[1]).read_bytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bpe = fetch_bpe_from_wheel(Path(tmp))
    derive(bpe, HERE)
    print(f"wrote {HERE / 'vocab.json'} and {HERE / 'merges.txt'}")


if __name__ == "__main__":
    main()

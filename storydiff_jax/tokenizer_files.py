"""CLIP tokenizer files (HF `vocab.json` + `merges.txt`) built from the BPE merges file CLIP ships.

Single-file checkpoints carry no tokenizer, and conversion must work offline, so we ship CLIP's own
merges list (`assets/bpe_simple_vocab_16e6.txt.gz`, from the MIT-licensed open_clip_torch / OpenAI CLIP
packages) and derive the vocabulary from it exactly the way CLIP's `SimpleTokenizer` does:

    256 byte symbols (in `bytes_to_unicode` order), the same 256 with `</w>`, one token per merge (the
    concatenated pair, in merge order), then `<|startoftext|>` and `<|endoftext|>`: 49408 entries.

SD1.5's `tokenizer/`, SDXL's `tokenizer/` and `tokenizer_2/` all use this vocabulary; they differ only
in the pad token (`<|endoftext|>` for the OpenAI CLIP encoders, `!` = id 0 for OpenCLIP bigG).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ASSET = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
# CLIP keeps only the first 49152 - 256 - 2 merges of the file, so that 256 bytes + 256 `</w>` bytes
# + merges + 2 specials = 49408 (the line after the version header is merge 0).
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (printable bytes map to themselves).

    The insertion order matters: it is the order of the first 256 vocabulary ids.
    """
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_merges(path: str | Path = ASSET) -> list[tuple[str, str]]:
    """The merges CLIP uses, in priority order (first line of the file is a version header)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merges file (expected {N_MERGES} pairs after the header)")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table, built from the merges as `SimpleTokenizer.__init__` does."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)  # duplicates would silently shift ids
    return vocab


def write_clip_tokenizer(out_dir: str | Path, *, pad_token: str = EOS, model_max_length: int = 77,
                    merges_path: str | Path = ASSET) -> Path:
    """Write an HF CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) to `out_dir`; returns it. Loadable with `CLIPTokenizer.from_pretrained`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = load_merges(merges_path)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # HF's merges.txt also starts with a version line that readers skip.
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out

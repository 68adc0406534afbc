"""CLIP's byte-level BPE tokenizer, without transformers (stdlib, numpy and `regex` only).

Reads a Hugging Face CLIP tokenizer folder (`vocab.json` + `merges.txt`, or only `tokenizer.json`) and
gives the same ids as transformers 5's `CLIPTokenizer(prompts, padding="max_length", max_length=77,
truncation=True).input_ids`. That tokenizer is the Rust `tokenizers` pipeline below, step by step:

1. **Added tokens** (the special tokens: `<|startoftext|>`, `<|endoftext|>`, and the pad token, which is
   `!` in SDXL's `tokenizer_2`) are cut out of the text first, leftmost-longest. Tokens flagged
   `normalized: false` (a plain-string special token is) are matched in the raw text, case-sensitively;
   `normalized: true` ones in the normalized text. So with pad `!` every `!` in a prompt becomes the
   pad id 0, not `!</w>` (256), as in transformers.
2. **Normalize** each remaining piece: NFC, every run of Unicode whitespace -> one space, lower-case
   (character by character: a final capital sigma becomes `σ`, not `ς`). No ftfy, no HTML unescape.
3. **Pre-tokenize**: keep only the matches of CLIP's split regex (whitespace is dropped), then the
   byte-level GPT-2 split (which only changes literal `<|...|>` strings) and the byte -> unicode map.
4. **BPE** each word with `</w>` on its last symbol, merging the lowest-ranked pair (leftmost first).
5. `<|startoftext|>` + ids[:max_length - 2] + `<|endoftext|>`, right-padded with the pad id.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import regex

from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.tokenizer_files import BOS, EOS, bytes_to_unicode

END_OF_WORD = "</w>"

# Unicode White_Space, the `\s` of the Oniguruma regexes `tokenizers` runs (U+001C..U+001F are not in it,
# unlike Python's str.isspace).
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Three Unicode versions meet here. `tokenizers` 0.23 splits words with Oniguruma's Unicode 16 tables and
# lower-cases with Rust's Unicode 17 ones; the `regex` module (2026.x) knows Unicode 18, Python 3.11's
# str.lower() only Unicode 14. So: letters / numbers assigned after Unicode 16 are taken out of \p{L} /
# \p{N} (to Oniguruma they are unassigned, i.e. "other" characters), and the case pairs Python 3.11 lacks
# are added by hand. Only characters from scripts encoded in 2024 or later are affected.
_NOT_L = ("\u0558\u058b\u058c\u088f\u0c5c\u0cdc\u208f\u209d-\u209f\ua7ce\ua7cf\ua7d2\ua7d4\ua7dd\ua7e2\ua7f1"
          "\uab6c\uab6d\U000107bb-\U000107bf\U00010940-\U00010959\U00010ec5-\U00010ec7\U00010ed9-\U00010eee"
          "\U00011b0a\U00011db0-\U00011ddb\U00011df1\U00016ea0-\U00016eb8\U00016ebb-\U00016ed3"
          "\U00016ff2\U00016ff3\U000187f8-\U000187ff\U00018cd6-\U00018cda\U00018d09-\U00018d20"
          "\U00018d80-\U00018df2\U00018e00-\U00019191\U000191a0-\U000191d2\U0001b123-\U0001b128\U0001b168"
          "\U0001d6a6\U0001df1f-\U0001df24\U0001df2b-\U0001df81\U0001df90-\U0001df96\U0001dfcd-\U0001dfff"
          "\U0001e6c0-\U0001e6de\U0001e6e0-\U0001e6e2\U0001e6e4\U0001e6e5\U0001e6e7-\U0001e6ed"
          "\U0001e6f0-\U0001e6f4\U0001e6fe\U0001e6ff\U0002b73a-\U0002b73f\U0002b81e\U0002cea2-\U0002cead"
          "\U000323b0-\U00033479\U0003d000-\U0003fc3f")
_NOT_N = "\U00011de0-\U00011de9\U0001246f\U00012475-\U0001247f\U00012550-\U00012686\U00016ff4-\U00016ff6"
_L = f"[\\p{{L}}--[{_NOT_L}]]"
_N = f"[\\p{{N}}--[{_NOT_N}]]"
_LOWER_EXTRA = {0x1C89: 0x1C8A, 0xA7CB: 0x0264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3, 0xA7D4: 0xA7D5,
                0xA7DA: 0xA7DB, 0xA7DC: 0x019B,
                **{c: c + 0x20 for c in range(0x10D50, 0x10D66)}, **{c: c + 0x1B for c in range(0x16EA0, 0x16EB9)}}
_LOWER_EXTRA = {k: v for k, v in _LOWER_EXTRA.items() if chr(k).lower() == chr(k)}  # only what Python lacks
_LOWER_EXTRA_RX = regex.compile("[" + "".join(map(chr, _LOWER_EXTRA)) + "]") if _LOWER_EXTRA else None

_WS_RUN = regex.compile(f"[{_WS}]+")
# CLIP's word split (transformers' CLIPTokenizer pre-tokenizer, Split with invert=True: keep the matches).
_CLIP_SPLIT = regex.compile(
    rf"(?V1)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|{_L}+|{_N}|[^{_WS}{_L}{_N}]+")
# The ByteLevel pre-tokenizer's own GPT-2 split, applied to each CLIP word (use_regex=True by default).
_GPT2_SPLIT = regex.compile(
    rf"(?V1)'s|'t|'re|'ve|'m|'ll|'d| ?{_L}+| ?{_N}+| ?[^{_WS}{_L}{_N}]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULT_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
_CACHE_LIMIT = 100_000


# str.translate table from latin-1 code points (one per UTF-8 byte) to the byte-level characters.
_BYTE_TABLE = {b: c for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True)
class AddedToken:
    """A token cut out of the text before BPE (transformers' / tokenizers' AddedToken flags)."""
    content: str
    id: int
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def _lowercase(text: str) -> str:
    # `tokenizers` lower-cases per character; str.lower() differs only by the final-sigma rule.
    text = text.lower() if "Σ" not in text else "".join(c.lower() for c in text)
    if _LOWER_EXTRA_RX is not None and _LOWER_EXTRA_RX.search(text):
        text = text.translate(_LOWER_EXTRA)
    return text


def normalize(text: str) -> str:
    """transformers' CLIP normalizer: NFC, whitespace runs -> " ", lower-case."""
    return _lowercase(_WS_RUN.sub(" ", unicodedata.normalize("NFC", text)))


class CLIPTokenizer:
    """CLIP BPE tokenizer. Build with `CLIPTokenizer.from_folder(path)`; call on prompts for ids."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str = BOS, eos_token: str = EOS, unk_token: str = EOS, pad_token: str = EOS,
                 added_tokens: Sequence[AddedToken] | None = None, model_max_length: int = 77):
        self.vocab = dict(vocab)
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise CheckpointError(f"CLIP tokenizer: merge {rank} ({a!r} {b!r}) uses a token missing from the "
                                      "vocabulary; vocab.json and merges.txt do not belong together")
            self.ranks.setdefault((a, b), rank)
        added = {t.content: t for t in (added_tokens or ())}
        for t in (bos_token, eos_token, unk_token, pad_token):
            if t not in added:
                if t not in self.vocab:
                    raise CheckpointError(f"CLIP tokenizer: special token {t!r} is not in the vocabulary; "
                                          "fix the tokenizer's special_tokens_map.json / tokenizer_config.json")
                added[t] = AddedToken(t, self.vocab[t])
        self.added_tokens = tuple(added.values())
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_token_id, self.eos_token_id = added[bos_token].id, added[eos_token].id
        self.unk_token_id, self.pad_token_id = added[unk_token].id, added[pad_token].id
        self.model_max_length = model_max_length
        self._raw_split = _added_token_regex([t for t in self.added_tokens if not t.normalized])
        self._norm_split = _added_token_regex([t for t in self.added_tokens if t.normalized], normalize)
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """Load a tokenizer folder: vocab.json + merges.txt, else tokenizer.json; special tokens from
        tokenizer_config.json / special_tokens_map.json as transformers resolves them."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"tokenizer folder {folder} does not exist; pass the pipeline's tokenizer/ folder")
        config = _read_json(folder / "tokenizer_config.json", optional=True) or {}
        smap = _read_json(folder / "special_tokens_map.json", optional=True) or {}
        if not isinstance(config, dict) or not isinstance(smap, dict):
            raise CheckpointError(f"{folder}: tokenizer_config.json / special_tokens_map.json is not a JSON object; "
                                  "restore the tokenizer folder")
        json_added: list[dict] = []
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            vocab, merges, json_added = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise CheckpointError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json; point at a "
                                  "CLIP tokenizer folder (e.g. the pipeline's tokenizer/)")
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise CheckpointError(f"{folder}: the vocabulary is not a {{token: id}} mapping; "
                                  "restore the tokenizer files")

        # Which tokens are cut out before BPE, and their flags, the way transformers 5 decides: the
        # config's added_tokens_decoder if it has one (then special_tokens_map.json is not read), else
        # tokenizer.json's added_tokens with the special tokens of special_tokens_map.json overriding
        # the config's. Then bos, eos, unk, pad are registered in that order, each overwriting the flags
        # of a token with the same content: a plain string is normalized=False unless it names a token
        # of the decoder, a dict carries its own flags.
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            try:
                entries = [dict(v, id=int(k)) for k, v in decoder.items() if isinstance(v, dict)]
            except ValueError:
                raise CheckpointError(f"{folder}: tokenizer_config.json added_tokens_decoder has a non-integer id; "
                                      "restore the tokenizer folder") from None
            specials = {k: config.get(k) for k in _SPECIAL_KEYS}
        else:
            entries = json_added
            specials = {k: smap.get(k, config.get(k)) for k in _SPECIAL_KEYS}
        declared: dict[str, AddedToken] = {}
        for e in entries:  # an id from the vocabulary wins over the declared one, as in `tokenizers`
            content = e.get("content")
            tok = _added_token(e, vocab.get(content, e.get("id")) if isinstance(content, str) else None, folder)
            declared[tok.content] = tok
        added = dict(declared)
        names = {}
        for key in _SPECIAL_KEYS:
            value = specials.get(key) or _DEFAULT_SPECIALS[key]
            content = value.get("content") if isinstance(value, dict) else value
            if not isinstance(content, str) or not content:
                raise CheckpointError(f"{folder}: {key} must be a token string or a dict with a 'content' string, "
                                      f"got {value!r}; fix the tokenizer config")
            if content in declared:  # transformers maps special tokens onto the declared added tokens
                tok = declared[content]
            elif content not in vocab:
                raise CheckpointError(f"{folder}: {key} {content!r} is not in the vocabulary; "
                                      "fix the tokenizer config")
            elif isinstance(value, dict):
                tok = _added_token(value, vocab[content], folder)
            else:
                tok = AddedToken(content, vocab[content])
            added[content] = tok
            names[key] = content
        max_len = config.get("model_max_length", 77)
        model_max_length = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e9 else 77
        return cls(vocab, merges, added_tokens=list(added.values()), model_max_length=model_max_length,
                   **names)

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without <|startoftext|> / <|endoftext|> and without truncation."""
        ids: list[int] = []
        for piece, added_id in _split(text, self._raw_split):
            if added_id is not None:
                ids.append(added_id)
                continue
            for part, part_id in _split(normalize(piece), self._norm_split):
                if part_id is not None:
                    ids.append(part_id)
                else:
                    for word in _CLIP_SPLIT.findall(part):
                        ids.extend(self._word_ids(word))
        return ids

    def __call__(self, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
        """Prompts -> int32 [B, max_length]: <|startoftext|>, tokens (truncated), <|endoftext|>, pad."""
        if max_length < 2:
            raise ConfigError(f"tokenizer max_length must be at least 2 (start and end tokens), got {max_length}")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError("tokenizer input must be a prompt string or a list of prompt strings")
        out = np.full((len(prompts), max_length), self.pad_token_id, dtype=np.int32)
        for i, prompt in enumerate(prompts):
            ids = [self.bos_token_id, *self.encode(prompt)[:max_length - 2], self.eos_token_id]
            out[i, :len(ids)] = ids
        return out

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            try:
                ids = tuple(i for sub in _GPT2_SPLIT.findall(word)
                            for i in self._bpe(sub.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE)))
            except UnicodeEncodeError:
                raise ConfigError(f"prompt text {word!r} is not valid Unicode (a lone surrogate); "
                                  "fix the prompt's encoding") from None
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _bpe(self, chars: str) -> list[int]:
        symbols = list(chars)
        symbols[-1] += END_OF_WORD
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = -1, None
            for i in range(len(symbols) - 1):
                r = ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        unk = self.unk_token_id
        return [self.vocab.get(s, unk) for s in symbols]


# -- helpers ---------------------------------------------------------------------------------------

def _added_token_regex(tokens: Sequence[AddedToken], transform=lambda s: s):
    """(compiled regex, ids by group) matching the tokens leftmost-longest, or None for no tokens."""
    patterns: dict[str, AddedToken] = {}
    for t in tokens:
        content = transform(t.content)
        if content:
            patterns.setdefault(content, t)
    if not patterns:
        return None
    parts, ids = [], []
    for content in sorted(patterns, key=len, reverse=True):  # longest first = leftmost-longest
        t = patterns[content]
        p = regex.escape(content)
        if t.single_word:
            p = rf"(?<!\w){p}(?!\w)"
        if t.lstrip:
            p = rf"[{_WS}]*{p}"
        if t.rstrip:
            p = rf"{p}[{_WS}]*"
        parts.append(f"({p})")
        ids.append(t.id)
    return regex.compile("|".join(parts)), ids


def _split(text: str, splitter) -> list[tuple[str, int | None]]:
    """[(piece, None)] for text and [(match, id)] for the added tokens cut out of it."""
    if not text:
        return []
    if splitter is None:
        return [(text, None)]
    rx, ids = splitter
    out, pos = [], 0
    for m in rx.finditer(text):
        if m.start() > pos:
            out.append((text[pos:m.start()], None))
        out.append((m.group(), ids[m.lastindex - 1]))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], None))
    return out


def _added_token(d: dict[str, Any], tok_id: Any, folder: Path) -> AddedToken:
    content = d.get("content")
    if not isinstance(content, str) or not content or not isinstance(tok_id, int):
        raise CheckpointError(f"{folder}: added token {d!r} has no content or id; fix the tokenizer config")
    return AddedToken(content, tok_id, normalized=bool(d.get("normalized", False)), lstrip=bool(d.get("lstrip")),
                      rstrip=bool(d.get("rstrip")), single_word=bool(d.get("single_word")))


def _read_json(path: Path, optional: bool = False) -> Any:
    if optional and not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}; restore the tokenizer files") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}; restore the tokenizer files") from None
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if (n == 1 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path} line {n} is not a merge ('a b'); restore the tokenizer files")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path} does not hold a BPE model; point at a CLIP tokenizer folder")
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise CheckpointError(f"{path}: merge {m!r} is not a pair; restore the tokenizer files")
        merges.append((str(pair[0]), str(pair[1])))
    added = [a for a in data.get("added_tokens") or [] if isinstance(a, dict)]
    return model["vocab"], merges, added

"""storydiff_jax.tokenizer.CLIPTokenizer against transformers' CLIPTokenizer (the Rust `tokenizers` one).

The real CLIP vocabulary is built from the shipped BPE merges (storydiff_jax/tokenizer_files.py) with both pad
tokens SD uses (`<|endoftext|>`; `!` for SDXL's tokenizer_2). Ids must be identical: same normalization,
split, byte-level BPE, special-token handling, truncation and padding.
"""

from __future__ import annotations

import json
import random
import shutil
import time

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from storydiff_jax import tokenizer as tok_mod  # noqa: E402
from storydiff_jax.errors import CheckpointError, ConfigError  # noqa: E402
from storydiff_jax.tokenizer import CLIPTokenizer  # noqa: E402
from storydiff_jax.tokenizer_files import write_clip_tokenizer  # noqa: E402

PAD_TOKENS = {"eot": "<|endoftext|>", "bang": "!"}

PROMPTS = [
    "",
    "a photo of a cat",
    "A girl with red hair, walking in the park, sunny day, highly detailed",
    "[Bob] wakes up early, makes coffee and reads the newspaper.",
    "it's a beautiful day, don't you think? we'll see; they're here, I'm sure, you've been",
    "IT'S LOUD!!! DON'T SHOUT",
    "the 1990s, a 3D render, 8k, 4K UHD, f/1.8, 50mm, 2024-05-17, 3.14159, #1 fan",
    "punctuation runs: ... !!! ??? ?!?! --- *** ((masterpiece)) [[best quality]] {a|b} <lora:x:0.8>",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\n  leading and trailing   ",
    "   \t\n  ",
    "café naïve résumé Zürich São Paulo Ångström façade",
    "cafe\u0301 nai\u0308ve (decomposed accents)",
    "emoji 🐱🐶 🚀✨ 👩‍👩‍👧 ❤️ 👍🏽",
    "東京の夜景, 一只可爱的猫, 서울의 거리, Москва зимой, Αθήνα ΟΔΟΣ, עברית, العربية, हिन्दी",
    "Straße STRASSE İstanbul ǅ ﬁne ligature ＦＵＬＬＷＩＤＴＨ ①②③ ½ ² Ⅻ",
    "non-breaking\u00a0space, ideographic\u3000space, em\u2003space, zero\u200bwidth, bom\ufeffhere",
    "control\x00chars\x1c\x1f\x7f and soft\u00adhyphen",
    "'quoted' \"double\" ‘curly’ “curly” «guillemets» — en–dash … ellipsis",
    "''s '''t 's 'S 'LL 'Ve it''s",
    "email me at test@example.com or visit https://example.com/path?q=1&x=2#frag",
    "C++ C# .NET node.js __init__ snake_case camelCase kebab-case",
    "$100 €50 £20 ¥1000 100% 5° 10×20 a+b=c a<b>c a&b",
    "Chapter 1: The Beginning. Chapter 2: The Middle. Chapter 3: The End.",
    "a knight in shining armor riding a horse through a misty forest at dawn, volumetric light",
    "a cyberpunk city street at night, neon signs, rain reflections, blade runner style",
    "watercolor painting of a lighthouse on a cliff, seagulls, crashing waves",
    "portrait of an old fisherman, wrinkles, grey beard, by rembrandt, oil on canvas",
    "low poly 3d model of a fox, isometric view, pastel colors, blender render",
    "anime style girl with long silver hair and blue eyes, cherry blossoms falling",
    "The same boy (age 7), wearing a yellow raincoat; jumping in puddles!",
    "<|startoftext|> literal specials <|endoftext|> in text",
    "case <|ENDOFTEXT|> and <|EndOfText|> and <| endoftext |>",
    "hello!world! ! !! a!b",
    "tab\tseparated\tvalues\t1\t2\t3",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "x" * 200,
    "one, two, three, four, five, six, seven, eight, nine, ten, " * 8,  # truncates
    " ".join(f"word{i}" for i in range(120)),  # truncates
    "ΣΑΣ ΟΔΟΣ σοφός ΣΟΦΟΣ",  # final sigma: tokenizers lower-cases per character
    "\U00010940\U00010941 x\U00011de0y \U00010d50 \u1c89",  # letters newer than tokenizers' Unicode tables
    "Ⓐⓑⓒ 𝕬𝖇𝖈 𝐀𝐁𝐂 ℌℑℜ",
    "mixed123numbers456and789letters 0.5x 1e-3 1,000,000",
    "a/b\\c|d~e`f^g",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizers")
    return {name: write_clip_tokenizer(root / name, pad_token=pad) for name, pad in PAD_TOKENS.items()}


@pytest.fixture(scope="module")
def pairs(folders):
    """name -> (ours, transformers') tokenizer of the same folder."""
    return {name: (CLIPTokenizer.from_folder(f), transformers.CLIPTokenizer.from_pretrained(str(f)))
            for name, f in folders.items()}


def _ref_ids(ref, prompts, max_length=77):
    return np.asarray(ref(list(prompts), padding="max_length", max_length=max_length, truncation=True).input_ids)


def _assert_same(ours, ref, prompts, max_length=77):
    got = ours(list(prompts), max_length=max_length)
    want = _ref_ids(ref, prompts, max_length)
    assert got.dtype == np.int32 and got.shape == (len(prompts), max_length)
    bad = [i for i in range(len(prompts)) if not np.array_equal(got[i], want[i])]
    assert not bad, "\n".join(f"{prompts[i]!r}:\n ours {got[i].tolist()}\n ref  {want[i].tolist()}" for i in bad[:5])


def test_prompt_list_is_varied():
    assert len(PROMPTS) >= 40
    assert any(len(p.split()) > 75 for p in PROMPTS)


@pytest.mark.parametrize("name", sorted(PAD_TOKENS))
def test_matches_transformers(pairs, name):
    ours, ref = pairs[name]
    assert ours.pad_token == PAD_TOKENS[name] and ours.pad_token_id == ref.pad_token_id
    assert (ours.bos_token_id, ours.eos_token_id) == (49406, 49407)
    _assert_same(ours, ref, PROMPTS)
    _assert_same(ours, ref, PROMPTS, max_length=16)  # other lengths truncate / pad the same way


@pytest.mark.parametrize("name", sorted(PAD_TOKENS))
def test_random_text_matches_transformers(pairs, name):
    """Random mixes of ASCII, whitespace, apostrophes and arbitrary code points (all planes)."""
    ours, ref = pairs[name]
    rng = random.Random(1234)
    pool = [chr(c) for c in range(32, 127)] * 10 + list("\t\n '") * 10
    pool += [c for c in (chr(rng.randrange(0x80, 0x40000)) for _ in range(3000))
             if not 0xD800 <= ord(c) < 0xE000]
    prompts = ["".join(rng.choice(pool) for _ in range(rng.randrange(0, 60))) for _ in range(300)]
    _assert_same(ours, ref, prompts)


def test_character_classes_match_transformers(pairs):
    """Every code point in the ranges we patch (newer than tokenizers' Unicode tables) and a sample of
    all others is split, lower-cased and byte-encoded the same way (a full scan of all planes agreed
    when this was written; it takes too long for the test suite)."""
    ours, ref = pairs["eot"]
    cps = set(range(0x80, 0x3000, 3)) | set(range(0x3000, 0x40000, 211))
    for spec in (tok_mod._NOT_L, tok_mod._NOT_N, "".join(map(chr, tok_mod._LOWER_EXTRA))):
        i = 0
        while i < len(spec):
            if i + 2 < len(spec) and spec[i + 1] == "-":
                cps |= set(range(ord(spec[i]), ord(spec[i + 2]) + 1, 7)) | {ord(spec[i]), ord(spec[i + 2])}
                i += 3
            else:
                cps.add(ord(spec[i]))
                i += 1
    chars = [chr(c) for c in sorted(cps) if not 0xD800 <= c < 0xE000]
    texts = [" ".join(f"a{c}a !{c}! 1{c}1 {c.upper()}{c}" for c in chars[i:i + 200])
             for i in range(0, len(chars), 200)]
    want = ref(texts, add_special_tokens=False).input_ids
    bad = [t[:60] for t, w in zip(texts, want) if ours.encode(t) != w]
    assert not bad, bad[:3]


def test_encode_and_single_prompt(pairs):
    ours, ref = pairs["eot"]
    text = "It's a café, 1990s!"
    assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids
    assert ours.encode("") == []
    one = ours(text)
    assert one.shape == (1, 77) and one[0, 0] == 49406
    np.testing.assert_array_equal(one[0], ours([text])[0])
    assert ours([]).shape == (0, 77)
    with pytest.raises(ConfigError):
        ours(["ok", None])
    with pytest.raises(ConfigError):
        ours("x", max_length=1)
    with pytest.raises(ConfigError):
        ours("lone \ud800 surrogate")


def test_pad_bang_is_a_special_token(pairs):
    """With pad `!` (SDXL tokenizer_2), transformers cuts every `!` out as the pad token (id 0)."""
    ours, _ = pairs["bang"]
    assert ours.encode("wow!") == [ours.encode("wow")[0], 0]
    assert pairs["eot"][0].encode("wow!")[-1] == 256  # `!</w>` with the <|endoftext|> pad


def _variant(src, dst, smap=None, config_update=None, drop=()):
    shutil.copytree(src, dst)
    if smap is not None:
        (dst / "special_tokens_map.json").write_text(json.dumps(smap))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config_update or {})
    for key in drop:
        cfg.pop(key, None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _tok(content, normalized, typed=False):
    d = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **d} if typed else d


SPECIAL_PROMPTS = ["a <|ENDOFTEXT|> b!", "x<|startoftext|>y <|StartOfText|>", "a  <|end\u00a0oftext|> !!",
                   "<|endoftext|><|endoftext|>", "plain prompt"]


def test_special_token_configs(folders, tmp_path):
    """The special-token layouts real SD folders use, resolved the way transformers 5 does."""
    eot = folders["eot"]
    variants = [
        # SD1.5 (older files): AddedToken dicts normalized=True, pad a plain string.
        _variant(eot, tmp_path / "sd15", {"bos_token": _tok(tok_mod.BOS, True), "eos_token": _tok(tok_mod.EOS, True),
                                          "pad_token": tok_mod.EOS, "unk_token": _tok(tok_mod.EOS, True)},
                 {"bos_token": _tok(tok_mod.BOS, True, True), "eos_token": _tok(tok_mod.EOS, True, True),
                  "unk_token": _tok(tok_mod.EOS, True, True)}),
        # SDXL tokenizer_2 (newer files): added_tokens_decoder with the flags, pad "!".
        _variant(eot, tmp_path / "sdxl2", {"pad_token": "!"},
                 {"pad_token": "!", "added_tokens_decoder": {
                     "0": {**_tok("!", False), "special": True},
                     "49406": {**_tok(tok_mod.BOS, True), "special": True},
                     "49407": {**_tok(tok_mod.EOS, True), "special": True}}}),
        # No special_tokens_map.json and no special tokens in the config: CLIPTokenizer's defaults.
        _variant(eot, tmp_path / "bare", {}, None, drop=("bos_token", "eos_token", "unk_token", "pad_token")),
    ]
    (variants[-1] / "special_tokens_map.json").unlink()
    for folder in variants:
        ours = CLIPTokenizer.from_folder(folder)
        ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
        assert ours.pad_token_id == ref.pad_token_id, folder.name
        _assert_same(ours, ref, SPECIAL_PROMPTS + PROMPTS[:10])


@pytest.mark.parametrize("name", sorted(PAD_TOKENS))
def test_tokenizer_json_only(pairs, tmp_path, name):
    _, ref = pairs[name]
    ref.save_pretrained(tmp_path)
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (tmp_path / f).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    ours = CLIPTokenizer.from_folder(tmp_path)
    ref2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    _assert_same(ours, ref2, PROMPTS + SPECIAL_PROMPTS)


def test_errors(folders, tmp_path):
    def one_line(exc_info):
        msg = str(exc_info.value)
        assert msg and "\n" not in msg
        return msg

    with pytest.raises(CheckpointError) as e:
        CLIPTokenizer.from_folder(tmp_path / "missing")
    assert "does not exist" in one_line(e)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as e:
        CLIPTokenizer.from_folder(empty)
    assert "vocab.json" in one_line(e)

    corrupt = _variant(folders["eot"], tmp_path / "corrupt")
    (corrupt / "vocab.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        CLIPTokenizer.from_folder(corrupt)
    assert "vocab.json" in one_line(e)

    bad_merges = _variant(folders["eot"], tmp_path / "bad_merges")
    (bad_merges / "merges.txt").write_text("#version: 0.2\nq \u2603\n")
    with pytest.raises(CheckpointError) as e:
        CLIPTokenizer.from_folder(bad_merges)
    one_line(e)

    bad_pad = _variant(folders["eot"], tmp_path / "bad_pad", {"pad_token": "<pad>"}, {"pad_token": "<pad>"})
    with pytest.raises(CheckpointError) as e:
        CLIPTokenizer.from_folder(bad_pad)
    assert "<pad>" in one_line(e)


def test_timing(pairs, folders):
    """Not a benchmark: prints the time of both tokenizers on 1000 story prompts (no assertion)."""
    _, ref = pairs["eot"]
    rng = random.Random(0)
    words = ("a girl with red hair walking in the park , sunny day , highly detailed , 8k , cinematic "
             "lighting , it's raining , don't stop , the 1990s 3D render !!! café naïve [Bob] Lily").split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randrange(5, 60))) for _ in range(1000)]
    fresh = CLIPTokenizer.from_folder(folders["eot"])
    t0 = time.perf_counter()
    got = fresh(prompts)  # cold BPE cache
    t1 = time.perf_counter()
    got_warm = fresh(prompts)
    t2 = time.perf_counter()
    want = _ref_ids(ref, prompts)
    t3 = time.perf_counter()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_warm, want)
    print(f"\n1000 prompts: storydiff_jax {1e3 * (t1 - t0):.1f} ms cold / {1e3 * (t2 - t1):.1f} ms warm, "
          f"transformers {1e3 * (t3 - t2):.1f} ms")

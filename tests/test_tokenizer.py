"""The tokenizer: exact agreement with the original CLIP tokenizer, training, saving, shapes.

The reference (OpenAI's ``simple_tokenizer.py``, ``clip.tokenize`` and the vocabulary file)
comes from the ``clip-anytorch`` wheel, downloaded once with ``pip download --no-deps`` into
``~/.cache/unclip-tests`` and read from the zip; it is never installed (it would pull a CUDA
torch through torchvision).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import subprocess
import sys
import unicodedata
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import pytest
import torch

from unclip.tokenizer import Tokenizer, clean_text, train_tokenizer

CLIP_WHEEL = "clip-anytorch==2.6.0"


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "unclip-tests" / CLIP_WHEEL.replace("==", "-")


@lru_cache
def clip_wheel_file(name: str) -> Path:
    """A file of the reference ``clip`` package (e.g. ``"clip/model.py"``), extracted to the cache."""
    cache = _cache_dir()
    out = cache / name
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("clip_anytorch-*.whl"))
    if not wheels:
        tmp = cache / f"download-{os.getpid()}"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", CLIP_WHEEL, "-d", tmp],
            check=True,
            timeout=300,
        )
        for whl in tmp.glob("*.whl"):
            os.replace(whl, cache / whl.name)
        wheels = sorted(cache.glob("clip_anytorch-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        data = z.read(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = out.with_name(f".{out.name}.{os.getpid()}")
    tmp_file.write_bytes(data)
    os.replace(tmp_file, out)
    return out


def import_reference(name: str) -> ModuleType:
    """Import one module of the reference package from its extracted file (not as a package)."""
    path = clip_wheel_file(f"clip/{name}.py")
    spec = importlib.util.spec_from_file_location(f"_reference_clip_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache
def reference():
    """(SimpleTokenizer, the original ``clip.tokenize`` bound to it, our tokenizer)."""
    vocab = clip_wheel_file("clip/bpe_simple_vocab_16e6.txt.gz")
    ref = import_reference("simple_tokenizer").SimpleTokenizer(str(vocab))
    # clip.py itself needs torchvision; run its own ``tokenize`` function, lifted from the source
    source = clip_wheel_file("clip/clip.py").read_text(encoding="utf-8")
    fn = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "tokenize"
    )
    namespace = {"torch": torch, "Union": __import__("typing").Union, "List": list}
    namespace["_tokenizer"] = ref
    exec(compile(ast.Module([fn], []), "clip.py", "exec"), namespace)
    return ref, namespace["tokenize"], Tokenizer.from_clip_vocab(vocab)


def varied_strings(n: int = 1200, seed: int = 0) -> list[str]:
    """Deterministic captions that exercise every step of the original tokenizer."""
    rng = random.Random(seed)
    words = [
        "a", "photo", "of", "the", "cat", "dog", "red", "blue", "big", "small", "happy", "face",
        "with", "tears", "joy", "running", "astronaut", "rocket", "pizza", "cherry", "blossom",
        "noto", "style", "twemoji", "flat", "3d", "emoji",
    ]  # fmt: skip
    specials = [
        "don't", "It's", "we're", "they've", "I'm", "you'll", "he'd", "O'Neil", "rock'n'roll",
        "DON'T", "it'S", "''", "'", "it'ſ", "a\u0345b", "naïve", "café", "résumé", "Zürich",
        "São Paulo", "ÅNGSTRÖM", "ΟΔΥΣΣΕΥΣ", "Москва", "日本語", "漢字", "한국어", "中文字符",
        "العربية", "עברית", "हिन्दी", "ภาษาไทย", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️",
        "ﬁne", "ＦＵＬＬ", "cafÃ©", "“curly”", "‘single’", "&amp;", "&lt;b&gt;", "&#39;",
        "&quot;q&quot;", "&nbsp;", "&amp;amp;", "3.14159", "1,000,000", "2023-01-01", "½", "²",
        "٣", "௫", "Ⅻ", "!!!", "?!...", "---", "(((", ")))", "~~~", "@#$%^&*", "\t", "\n\n",
        "\u3000", "\u00a0", "\u2003", "\x00", "\x1c", "\x7f", "\u200b", "\u200d", "\ufeff",
        "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|ſtartoftext|>", "HELLO World",
        "e\u0301", "\u212a", "İstanbul", "ß", "ﬀ", "™", "©", "…", "•", "→", "€", "$5", "#tag",
        "@user", "http://example.com/a?b=c&d=e", "C++", "x86_64", "_", "__init__",
    ]  # fmt: skip
    blocks = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
        (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x2190, 0x21FF), (0x3040, 0x30FF),
        (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F),
    ]  # fmt: skip

    def random_chars(k: int) -> str:
        out = []
        while len(out) < k:
            lo, hi = rng.choice(blocks)
            ch = chr(rng.randint(lo, hi))
            if unicodedata.category(ch) not in ("Cn", "Cs"):
                out.append(ch)
        return "".join(out)

    texts = list(specials)
    while len(texts) < n:
        kind = len(texts) % 4
        if kind == 0:  # captions mixing words and edge cases
            parts = [rng.choice(words if rng.random() < 0.6 else specials) for _ in range(6)]
            sep = rng.choice([" ", "  ", "\t", " \n ", ",", ""])
            texts.append(sep.join(parts))
        elif kind == 1:  # random characters from many scripts
            texts.append(random_chars(rng.randint(1, 30)))
        elif kind == 2:  # long texts, well beyond the context length
            texts.append(
                " ".join(rng.choice(words + specials) for _ in range(rng.randint(60, 150)))
            )
        else:  # case, punctuation and whitespace runs
            w = rng.choice(words).upper() if rng.random() < 0.5 else rng.choice(words)
            texts.append(f"{rng.choice(specials)}{w}{'!' * rng.randint(0, 4)}   {random_chars(3)}")
    return texts


def test_vocabulary_matches_the_original():
    ref, _, tok = reference()
    assert tok.vocab_size == len(ref.encoder) == 49408
    assert tok.get_vocab() == ref.encoder
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)


def test_ids_match_the_original_tokenizer_on_varied_strings():
    ref, tokenize, tok = reference()
    texts = varied_strings()
    assert len(texts) >= 1000
    assert len({t for t in texts}) > 900  # varied, not one string repeated
    mismatches = [t for t in texts if tok.encode(t) != ref.encode(t)]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"
    # the whole tensor, with start/end tokens, padding and truncation, as clip.tokenize gives it
    expected = tokenize(texts, context_length=77, truncate=True)
    got = tok(texts)
    assert got.dtype == torch.long
    assert torch.equal(got, expected)
    assert (got.shape[1] == 77) and bool((got[:, -1] == tok.eot_token_id).any())  # some truncated


def test_decode_matches_the_original():
    ref, _, tok = reference()
    checked = 0
    for text in varied_strings(200, seed=1):
        ids = ref.encode(text)
        if tok.sot_token_id in ids or tok.eot_token_id in ids:
            continue  # ours stops at the end token (rows are padded after it)
        assert tok.decode(ids) == ref.decode(ids).strip()
        checked += 1
    assert checked > 150


def test_call_pads_truncates_and_keeps_one_end_token():
    _, _, tok = reference()
    out = tok(["a cat", "word " * 100], context_length=16)
    assert out.shape == (2, 16)
    short = out[0].tolist()
    assert short[0] == tok.sot_token_id
    n = short.index(tok.eot_token_id)
    assert short[n + 1 :] == [0] * (16 - n - 1)
    assert tok.decode(out[0]) == "a cat"
    assert out[1, -1] == tok.eot_token_id
    assert (out == tok.eot_token_id).sum(dim=1).tolist() == [1, 1]
    assert tok("a cat").shape == (1, 77)


def test_clean_text():
    assert clean_text("  Hello&amp;amp;\t\n World  ") == "hello& world"
    assert clean_text("a\x1cb") == clean_text("a\x1cb").strip()


def test_without_ftfy_cleaning_falls_back_with_a_warning(monkeypatch):
    import unclip.tokenizer as module

    _, _, tok = reference()
    expected = tok.encode("a photo of a café")
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy now raises ImportError
    monkeypatch.setattr(module, "_warned_no_ftfy", False)
    with pytest.warns(UserWarning, match="ftfy"):
        assert tok.encode("a photo of a café") == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("again")  # warned once only


CAPTIONS = [
    f"{face}, {style} style"
    for face in ["grinning face", "cat face", "red heart", "cherry blossom", "rocket", "pizza"]
    for style in ["twemoji", "noto", "openmoji", "fluent flat", "emojione"]
]


def test_train_save_load_roundtrip(tmp_path):
    tok = train_tokenizer(CAPTIONS * 3, vocab_size=600, min_frequency=2, context_length=24)
    assert 514 < tok.vocab_size <= 600
    assert (tok.sot_token_id, tok.eot_token_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    ids = tok(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), 24)
    # learnt merges make the captions shorter than their bytes
    lengths = [len(tok.encode(c)) for c in CAPTIONS]
    assert sum(lengths) < 0.5 * sum(len(c.encode()) for c in CAPTIONS)
    decoded = [tok.decode(row) for row in ids]
    assert decoded[0] == "grinning face , twemoji style"  # words and punctuation split
    assert torch.equal(tok(decoded), ids)
    # unseen characters still encode (every byte is in the vocabulary) and decode back
    assert tok.decode(tok("日本 ☃ x")[0]) == "日本 ☃ x"
    tok.save(tmp_path / "tokenizer")
    back = Tokenizer.load(tmp_path / "tokenizer")
    assert back.context_length == 24 and back.vocab_size == tok.vocab_size
    texts = [*CAPTIONS, "新しい"]
    assert torch.equal(back(texts), tok(texts))


def test_train_rejects_tiny_vocabularies_and_load_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match="514"):
        train_tokenizer(CAPTIONS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="nothing"):
        Tokenizer.load(tmp_path / "nothing")


def test_saved_clip_vocabulary_roundtrip(tmp_path):
    _, _, tok = reference()
    tok.save(tmp_path / "tok")
    back = Tokenizer.load(tmp_path / "tok")
    texts = varied_strings(100, seed=2)
    assert torch.equal(back(texts), tok(texts))

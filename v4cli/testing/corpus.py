"""A mixed text corpus for tokenizer equivalence tests: code, prose in many scripts, emoji, whitespace runs and
special tokens, at least 1 MB, deterministic, built from what every install has (no download)."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

# a sentence in each of several scripts (our own text)
PROSE = (
    "The quick brown fox jumps over the lazy dog; naïve café façade, résumé — “quoted” ‘text’…",
    "Der Bär läuft schnell über die Straße, während es draußen regnet.",
    "Быстрая коричневая лиса перепрыгивает через ленивую собаку.",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "敏捷的棕色狐狸跳过了懒狗。我想在苹果公司工作1314151天～",
    "素早い茶色の狐が怠け者の犬を飛び越える。カタカナとひらがな。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "השועל החום המהיר קופץ מעל הכלב העצלן.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "สุนัขจิ้งจอกสีน้ำตาลกระโดดข้ามสุนัขขี้เกียจ",
    "កាន់តែពិសេសអាច Tiếng Việt có dấu: Những con cáo nâu nhanh nhẹn.",
    "3 33 333 3333 33333 3.3 3..3 3...3 1,000,000 0x1F 1e-6 ½ ² ① ٣٤٥ ४५६",
)
SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
            "｜DSML｜", "<｜latest_reminder｜>", "<tool_result>", "</tool_result>")


def _emoji(rng: random.Random, n: int) -> str:
    ranges = ((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x2600, 0x26FF))
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.2:
            out.append(rng.choice(("\u200d", "\ufe0f", "\U0001F3FD", " ")))
    return "".join(out)


def mixed_corpus(min_bytes: int = 1 << 20, seed: int = 0) -> str:
    """≥ min_bytes of text: the standard library's Python sources interleaved with prose, emoji, whitespace runs
    and the V4 prompt format's special tokens."""
    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))
    parts: list[str] = []
    size = 0
    i = 0
    while size < min_bytes:
        code = files[i % len(files)].read_text(encoding="utf-8", errors="replace")[:20000]
        i += 1
        extra = [rng.choice(PROSE) for _ in range(8)]
        extra.append(_emoji(rng, 40))
        extra.append(rng.choice((" " * rng.randint(2, 40), "\t" * rng.randint(1, 8), "\n" * rng.randint(2, 6),
                                 " \n \n\n \t \t\t \t\n", "\r\n" * 3)))
        extra.append(rng.choice(SPECIALS))
        rng.shuffle(extra)
        chunk = code + "\n" + " ".join(extra) + "\n"
        parts.append(chunk)
        size += len(chunk.encode())
    return "".join(parts)

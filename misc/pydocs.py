"""
Python's own documentation as an offline English corpus, for bench.py: the reference manual's topics and the standard
library's docstrings, as jsonl (the tokenize benchmark), as parquet files shaped like FineWeb-Edu's (the download
benchmark), or as token shards (bench.py gpu's training data).
"""

import ast
import glob
import json
import os
import pydoc_data.topics
import random
import sys
import sysconfig

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules

from utils import EOT, get_tokenizer  # noqa: E402


def python_docs_corpus(docstrings=True):
    """English text that ships with Python itself, no download: the reference manual's topics (pydoc_data, 79
    documents, 139k GPT-2 tokens) and every long docstring of the standard library's modules, classes and functions
    (read with ast, nothing imported; seconds to parse). About 2,400 documents and 480k GPT-2 tokens."""
    docs = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())]
    if not docstrings:
        return docs
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if os.path.relpath(path, stdlib).startswith(("site-packages", "test", "idlelib", "lib2to3")):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc)
    return docs


def write_corpus(path, min_tokens, seed=0):
    """A jsonl corpus of at least min_tokens GPT-2 tokens: Python's own docs, paragraphs reshuffled in each copy."""
    docs = python_docs_corpus()
    tokens_per_copy = sum(len(t) for t in get_tokenizer().encode_ordinary_batch(docs))
    rng = random.Random(seed)
    with open(path, "w") as f:
        for copy in range(-(-min_tokens // tokens_per_copy)):
            for doc in docs:
                paragraphs = doc.split("\n\n")
                rng.shuffle(paragraphs)
                f.write(json.dumps(dict(id=copy, text="\n\n".join(paragraphs))) + "\n")


def write_parquet_corpus(folder, min_tokens, files=7, rows_per_group=1500, seed=0):
    """Parquet files like FineWeb-Edu's (the text column and a bulky one beside it, row groups of rows_per_group)
    holding write_corpus's documents. Returns the file names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_corpus(os.path.join(folder, "corpus.jsonl"), min_tokens, seed)
    with open(os.path.join(folder, "corpus.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    os.remove(os.path.join(folder, "corpus.jsonl"))
    rng, per_file = np.random.default_rng(seed), -(-len(texts) // files)
    for i in range(files):
        part = texts[i * per_file : (i + 1) * per_file]
        table = pa.table({"text": part, "metadata": [rng.bytes(200).hex() for _ in part]})
        pq.write_table(table, os.path.join(folder, f"{i:03d}_00000.parquet"), row_group_size=rows_per_group)
    return [f"{i:03d}_00000.parquet" for i in range(files)]


def write_pydocs_shards(data_dir, quick=False):
    """Python's documentation (English text, no download) as a val and a train shard; --quick: its topics only."""
    os.makedirs(data_dir, exist_ok=True)
    docs = get_tokenizer().encode_ordinary_batch(python_docs_corpus(docstrings=not quick))
    tokens = np.concatenate([np.array([EOT, *doc], dtype=np.uint16) for doc in docs])
    np.save(os.path.join(data_dir, "pydocs_val_000000.npy"), tokens[:50_000])
    np.save(os.path.join(data_dir, "pydocs_train_000001.npy"), tokens[50_000:])

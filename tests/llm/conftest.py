"""Fixtures for the LLM tests: tiny models built from configs, the MiniLM tokenizer, small corpora."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok():
    from outlierkit.llm.fixtures import tokenizer

    return tokenizer()


@pytest.fixture(scope="session")
def corpus(tok):
    from outlierkit.llm.corpus import build_corpus, load_documents

    return build_corpus(tok, load_documents(None), samples=10, seq_len=48, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from outlierkit.llm.fixtures import save_tiny

    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def batches(corpus):
    """One calibration batch of 5 samples (modules may override with their own ``batches``)."""
    return corpus.batches(5)[:1]


@pytest.fixture(scope="module")
def llama():
    """A fresh tiny LLaMA with planted outliers, shared within a test module."""
    from outlierkit.llm.fixtures import tiny_model

    return tiny_model("llama")

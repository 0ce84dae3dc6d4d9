"""utils.ShardedDataLoader: memory-mapped uint16 shards read as one stream, independent of the world size."""

import tracemalloc

import numpy as np
import pytest

from conftest import make_docs, write_shard
from utils import EOT, ShardedDataLoader, UserError


def loaders(data_dir, world_size, **kw):
    return [
        ShardedDataLoader(data_dir, "train", process_rank=r, num_processes=world_size, **kw) for r in range(world_size)
    ]


def global_steps(data_dir, world_size, grad_accum_steps, n_steps, B=2, T=8, **kw):
    """For each optimizer step, the set of rows (as tuples) that all ranks' micro-batches held together."""
    ranks = loaders(data_dir, world_size, B=B, T=T, **kw)
    steps = []
    for _ in range(n_steps):
        rows = []
        for _ in range(grad_accum_steps):
            for loader in ranks:
                x, y = loader.next_batch()
                rows += [tuple(r) for r in x.tolist()]
        steps.append(sorted(rows))
    return steps


def split_at_eot(stream):
    starts = np.flatnonzero(stream == EOT)
    assert starts[0] == 0
    return [stream[s:e] for s, e in zip(starts, [*starts[1:], len(stream)])]


def test_batches_read_every_token_in_order_across_shards(shard_dir):
    stream = shard_dir("train", [37, 50, 29, 64])
    B, T = 2, 8
    loader = ShardedDataLoader(shard_dir.dir, "train", B=B, T=T)
    seen = []
    for i in range(len(stream) // (B * T)):  # 11 batches: 176 of the 180 tokens
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and str(x.dtype) == "torch.int64"
        assert np.array_equal(y.numpy()[:, :-1], x.numpy()[:, 1:])  # y is x shifted by one
        start = i * B * T
        assert np.array_equal(x.numpy().ravel(), stream[start : start + B * T])
        assert np.array_equal(y.numpy().ravel(), stream[start + 1 : start + B * T + 1])
        seen.append(x.numpy().ravel())
    assert np.array_equal(np.concatenate(seen), stream[: len(seen) * B * T])
    # the next batch runs from the end of the last shard into the first one again (epoch 2)
    x, y = loader.next_batch()
    assert loader.position // loader.epoch_tokens == 1
    assert np.array_equal(x.numpy().ravel(), np.concatenate([stream[176:], stream[: B * T - 4]]))


@pytest.mark.parametrize("shuffle", [False, True])
def test_global_batches_do_not_depend_on_world_size(shard_dir, shuffle):
    shard_dir("train", [100, 73, 120, 90, 64])
    # 20 steps of 4 micro-batches x 2 rows x 8 tokens run through almost 4 epochs
    reference = global_steps(shard_dir.dir, 1, 4, 20, shuffle=shuffle, seed=3)
    for world_size in (2, 4):
        assert global_steps(shard_dir.dir, world_size, 4 // world_size, 20, shuffle=shuffle, seed=3) == reference


def test_ranks_read_disjoint_rows(shard_dir):
    shard_dir("train", [400])
    ranks = loaders(shard_dir.dir, 4, B=2, T=8)
    rows = [tuple(r) for loader in ranks for r in loader.next_batch()[0].tolist()]
    assert len(set(rows)) == 8


def shuffled_epochs(data_dir, epoch_tokens, n_epochs, seed, T=7):
    """The stream a shuffling loader reads, cut into epochs."""
    loader = ShardedDataLoader(data_dir, "train", B=1, T=T, shuffle=True, seed=seed)
    stream = np.concatenate([loader.next_batch()[0].numpy()[0] for _ in range(-(-n_epochs * epoch_tokens // T))])
    return [stream[e * epoch_tokens : (e + 1) * epoch_tokens] for e in range(n_epochs)]


def test_shuffle_visits_every_document_once_per_epoch_in_a_new_order(tmp_path):
    docs = make_docs(60, seed=4)
    shards = [docs[i : i + 12] for i in range(0, 60, 12)]  # 5 shards of 12 whole documents
    for i, shard in enumerate(shards):
        write_shard(tmp_path / f"test_train_{i + 1:06d}.npy", np.concatenate(shard))
    epoch_tokens = sum(len(d) for d in docs)
    key = {tuple(d.tolist()): (i // 12, i) for i, d in enumerate(docs)}  # document -> (its shard, its index)
    orders = []
    for stream in shuffled_epochs(tmp_path, epoch_tokens, 3, seed=1):
        read = split_at_eot(stream)
        assert sorted(key[tuple(d.tolist())][1] for d in read) == list(range(60))  # each document exactly once
        order = [key[tuple(d.tolist())] for d in read]
        shard_runs = [shard for n, (shard, _) in enumerate(order) if n == 0 or order[n - 1][0] != shard]
        assert sorted(shard_runs) == list(range(5))  # a shard's documents are read together, shards in some order
        orders.append([i for _, i in order])
    assert orders[0] != list(range(60)) and orders[0] != orders[1] != orders[2]
    assert any(orders[e][:12] != sorted(orders[e][:12]) for e in range(3))  # the order inside a shard changes too
    assert [
        [key[tuple(d.tolist())][1] for d in split_at_eot(s)] for s in shuffled_epochs(tmp_path, epoch_tokens, 3, 1)
    ] == orders
    assert [
        [key[tuple(d.tolist())][1] for d in split_at_eot(s)] for s in shuffled_epochs(tmp_path, epoch_tokens, 3, 2)
    ] != orders


def test_shuffle_keeps_a_document_cut_by_a_shard_boundary_in_one_piece(shard_dir):
    sizes = [100, 73, 120, 90, 64]
    stream = shard_dir("train", sizes)  # documents run across the shard boundaries
    pieces = []  # each shard cut before every EOT: the head of a cut document is a piece of its own
    for shard in np.split(stream, np.cumsum(sizes)[:-1]):
        cuts = [0, *np.flatnonzero(shard == EOT).tolist(), len(shard)]
        pieces += [shard[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    for epoch in shuffled_epochs(shard_dir.dir, len(stream), 2, seed=5):
        assert not np.array_equal(epoch, stream)
        unread, p = list(range(len(pieces))), 0
        while p < len(epoch):  # the epoch is the pieces, each read once, whole
            k = next(k for k in unread if np.array_equal(epoch[p : p + len(pieces[k])], pieces[k]))
            unread.remove(k)
            p += len(pieces[k])
        assert unread == []


def test_a_state_of_other_settings_is_refused(shard_dir):
    shard_dir("train", [50, 61, 70])
    loader = ShardedDataLoader(shard_dir.dir, "train", B=2, T=8, shuffle=True, seed=7)
    for key, value in dict(shuffle=False, seed=8, epoch_tokens=180).items():
        with pytest.raises(UserError, match=f"{key} was {value!r}, is now"):
            loader.load_state_dict(dict(loader.state_dict(), **{key: value}))


def test_state_round_trip_resumes_at_the_next_batch(shard_dir):
    shard_dir("train", [50, 61, 70])
    a = ShardedDataLoader(shard_dir.dir, "train", B=2, T=8, shuffle=True, seed=7)
    for _ in range(13):
        a.next_batch()
    state = a.state_dict()
    b = ShardedDataLoader(shard_dir.dir, "train", B=2, T=8, shuffle=True, seed=7)
    b.load_state_dict(state)
    for _ in range(10):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # the position is global: a resumed run may use another world size
    state = a.state_dict()
    two = loaders(shard_dir.dir, 2, B=2, T=8, shuffle=True, seed=7)
    for loader in two:
        loader.load_state_dict(state)
    one = [a.next_batch()[0], a.next_batch()[0]]
    assert np.array_equal(two[0].next_batch()[0], one[0]) and np.array_equal(two[1].next_batch()[0], one[1])
    c = ShardedDataLoader(shard_dir.dir, "train", B=2, T=8, shuffle=True, seed=8)
    with pytest.raises(UserError, match="seed was 7, is now 8"):
        c.load_state_dict(state)


def test_shards_are_memory_mapped(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"big_train_{i:06d}.npy", np.full(10_000_000, i, dtype=np.uint16))  # 20 MB each
    tracemalloc.start()
    loader = ShardedDataLoader(tmp_path, "train", B=4, T=64)
    for _ in range(100):
        loader.next_batch()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(loader.shards[0], np.memmap)
    assert peak < 2_000_000  # far less than one shard


def test_splits_and_names(shard_dir):
    train = shard_dir("train", [40, 40])
    val = shard_dir("val", [40], seed=1)
    (shard_dir.dir / "test_train_000009.npy.tmp").write_bytes(b"partial")  # an unfinished write is not a shard
    (shard_dir.dir / "notes.npy").write_bytes(b"")
    x, _ = ShardedDataLoader(shard_dir.dir, "val", B=1, T=8).next_batch()
    assert np.array_equal(x.numpy()[0], val[:8])
    x, _ = ShardedDataLoader(shard_dir.dir, "train", B=1, T=8).next_batch()
    assert np.array_equal(x.numpy()[0], train[:8])


def test_errors_name_the_problem(tmp_path, shard_dir):
    with pytest.raises(UserError, match="data directory .*nowhere does not exist"):
        ShardedDataLoader(tmp_path / "nowhere", "train", B=1, T=8)
    shard_dir("val", [100])
    with pytest.raises(
        UserError, match=f"no train shards in {tmp_path}: looked for files named <prefix>_train_NNNNNN.npy"
    ):
        ShardedDataLoader(tmp_path, "train", B=1, T=8)
    with pytest.raises(UserError, match=r"hold 100 tokens, fewer than one batch needs \(2 x 4 x 16 \+ 1 = 129\)"):
        ShardedDataLoader(tmp_path, "val", B=4, T=16, num_processes=2)
    write_shard(tmp_path / "x_train_000001.npy", np.arange(100), dtype=np.int32)
    with pytest.raises(UserError, match="x_train_000001.npy has dtype int32, expected uint16"):
        ShardedDataLoader(tmp_path, "train", B=1, T=8)
    write_shard(tmp_path / "x_train_000001.npy", [], dtype=np.uint16)
    with pytest.raises(UserError, match="x_train_000001.npy must be a non-empty 1-D array"):
        ShardedDataLoader(tmp_path, "train", B=1, T=8)
    (tmp_path / "x_train_000001.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="corrupt shard .*x_train_000001.npy"):
        ShardedDataLoader(tmp_path, "train", B=1, T=8)

"""The data stream: `D.Batches` (seeded, grouped by length, shuffled) and the batches each step and stage read.

A resumed run, gradient accumulation, DDP and stage 2 all rely on batch number i being a pure
function of (seed, i), and on stage 2 reading on where stage 1 stopped; a slip here still trains.
"""
import contextlib

import numpy as np
import torch

import data as D
import runtime
import sftkey
import train
from conftest import config, run_train, tiny_model

ENC = D.char_encoding()


# ---------------------------------------------------------------------------------------------
# D.Batches

def test_batches_are_a_pure_function_of_seed_and_index(tokenized):
    sequential = D.Batches(tokenized, 4, seed=9)
    expected = [sequential.indices(i).tolist() for i in range(35)]  # three and a half epochs
    shuffled = D.Batches(tokenized, 4, seed=9)
    for i in np.random.default_rng(0).permutation(35):  # jumping back and forth across epochs
        assert shuffled.indices(int(i)).tolist() == expected[i]
    x, y, roles = D.Batches(tokenized, 4, seed=9).get(12, "cpu")
    rows = expected[12]
    assert torch.equal(x, D.collate([tokenized.ids[j] for j in rows], [tokenized.roles[j] for j in rows], "cpu")[0])


def test_each_epoch_covers_distinct_examples_and_seeds_and_epochs_differ(tokenized):
    batches = D.Batches(tokenized, 4, seed=9)
    per_epoch = len(tokenized.ids) // 4
    assert batches.per_epoch == per_epoch == 10  # 42 examples: 40 used per epoch
    epochs = [np.concatenate([batches.indices(e * per_epoch + k) for k in range(per_epoch)]) for e in range(3)]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch.tolist())) == 40 and set(epoch.tolist()) <= set(range(42))
    assert epochs[0].tolist() != epochs[1].tolist()
    other = D.Batches(tokenized, 4, seed=10)
    first_epoch = lambda b: [b.indices(i).tolist() for i in range(per_epoch)]  # noqa: E731
    assert first_epoch(other) != first_epoch(batches)


def test_batches_hold_similar_lengths(tokenized):
    # 10 batches per epoch fit in one window of 16: sorted by length, each batch is a run of
    # consecutive lengths, so the batches' length ranges do not overlap.
    batches = D.Batches(tokenized, 4, seed=9)
    lengths = sorted([sorted(len(tokenized.ids[j]) for j in batches.indices(i)) for i in range(10)])
    assert len({l for b in lengths for l in b}) > 10  # many lengths: an unsorted epoch would overlap
    for a, b in zip(lengths, lengths[1:]):
        assert a[-1] <= b[0]


# After grouping by length, the batches' order within an epoch is shuffled.
# (Mutation audit: `return list(batches)`, each epoch running from the shortest batches to the longest.)

def test_batch_order_within_an_epoch_is_shuffled_not_shortest_first():
    tokenized = D.tokenize(D.synthetic_task(24, seed=5), ENC, block_size=96)
    n_sorted = 0
    for seed in range(6):
        batches = D.Batches(tokenized, 3, seed=seed)  # 24 examples: 8 batches, one window
        shortest = [min(len(tokenized.ids[j]) for j in batches.indices(i)) for i in range(8)]
        n_sorted += shortest == sorted(shortest)
    # A shuffled order of 8 batches is ascending with probability about 1/8! (ties aside).
    assert n_sorted <= 1


# ---------------------------------------------------------------------------------------------
# What the loop reads

def record_batch_numbers(monkeypatch) -> list[tuple[int, int, int]]:
    """(batch number i, parts, part) of every micro-batch D.Batches.get is asked for, in order."""
    fetched = []
    original = D.Batches.get

    def get(self, i, device, parts=1, part=0):
        fetched.append((i, parts, part))
        return original(self, i, device, parts=parts, part=part)
    monkeypatch.setattr(D.Batches, "get", get)
    return fetched


def test_a_step_reads_one_batch_cut_into_its_micro_batches_after_earlier_steps(tokenized, monkeypatch):
    fetched = record_batch_numbers(monkeypatch)
    run_train(tiny_model(), tokenized, config(grad_accum=3), iters=2, steps_before=5)
    assert fetched == [(5, 3, 0), (5, 3, 1), (5, 3, 2), (6, 3, 0), (6, 3, 1), (6, 3, 2)]


# Reading on means the same stream: batch i of a later stage is batch i of the stream seeded by --seed alone.
# (Mutation audit: the stream seeded by seed + steps_before; the batch numbers above stayed right, and so did
# the stage-2-by-hand and one-command runs, which both read the other stream.)

def test_a_stage_after_earlier_steps_reads_the_batches_of_the_stream_seeded_by_seed_alone(tokenized, monkeypatch):
    fed, original = [], D.Batches.get

    def get(self, *args, **kwargs):
        fed.append(original(self, *args, **kwargs))
        return fed[-1]
    monkeypatch.setattr(D.Batches, "get", get)
    run_train(tiny_model(), tokenized, config(batch_size=4, seed=7, val_acc_n=0), iters=2, steps_before=5)
    stream = D.Batches(tokenized, 4, seed=7)  # a fresh stream, as stage 1 of the run built it
    assert len(fed) == 2
    for got, i in zip(fed, (5, 6)):
        rows = stream.indices(i)
        expected = D.collate([tokenized.ids[j] for j in rows], [tokenized.roles[j] for j in rows], "cpu")
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


class OneOfTwoRanks(runtime.Dist):
    """Rank `rank` of a two-rank job, run alone: no process group, so no DDP wrapper and collectives that return
    their input (what is under test is only which micro-batches the rank reads)."""

    def wrap(self, model, device):
        return model

    def no_sync(self, net, last_micro_batch):
        return contextlib.nullcontext()

    def all_reduce(self, value, op="sum"):
        return value


# With DDP and gradient accumulation a step's batch is cut into ranks x grad_accum parts; together the ranks read
# each part once. (Mutation audit: `part=dist.rank + i`, so with --grad_accum 2 rank 1 read rank 0's second part
# again and the step's last part was never trained on; the DDP test runs --grad_accum 1, where both agree.)

def test_two_ranks_with_gradient_accumulation_read_every_part_of_a_step_once(tokenized, monkeypatch):
    fetched = record_batch_numbers(monkeypatch)
    for rank in (0, 1):
        train.train(tiny_model(), tokenized, tokenized, config(grad_accum=2, val_acc_n=0),
                    sftkey.Stage("test", (0.0, 1.0, 1.0), 2, 1e-2), "cpu", torch.float32, [], steps_before=3,
                    dist=OneOfTwoRanks(rank=rank, world=2))
    assert {parts for _, parts, _ in fetched} == {4}  # 2 ranks x 2 micro-batches
    for i in (3, 4):
        assert sorted(part for j, _, part in fetched if j == i) == [0, 1, 2, 3]


def test_run_stage2_continues_the_data_stream_after_stage1(tmp_path, monkeypatch):
    fetched = record_batch_numbers(monkeypatch)
    monkeypatch.setattr(runtime, "peak_flops", lambda *args, **kwargs: 1e12)  # slow, and not under test
    train.run(train.parse_args(["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "4",
                                "--n_train", "60", "--n_val", "6", "--n_test", "1", "--grad_accum", "2",
                                "--max_iters", "3", "--stage2_iters", "2", "--warmup_iters", "1",
                                "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32",
                                "--out_dir", str(tmp_path)]))
    assert [i for i, _, _ in fetched] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # stage 2 reads batches 3 and 4
    assert [part for _, _, part in fetched] == [0, 1] * 5

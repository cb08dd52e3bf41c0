"""hashtag_ce and HashtagHead across 1 to 4 gloo ranks (torch.multiprocessing) against one
process: the vocabulary-parallel loss and gradients, uneven batches and vocabulary slices,
checkpoint resharding, sampled mode, and bad input raising on every rank without a hang."""

import os

import pytest
import torch
import torch.distributed as dist

from engine.distributed import spawn_ranks
from engine.heads import HashtagHead
from engine.ops import hashtag_ce
from engine.ops.hashtag_ce import vocab_slices

pytestmark = pytest.mark.slow  # a minute or more together on 2 cores

V, D, K = 101, 24, 3  # a prime vocabulary: no world size divides it
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3)
TIMEOUT_S = 240
# (backend, reduction) runs per rank. The ranks hold CPU tensors, which the Triton kernels
# take only in the interpreter; the reduction's collectives are the same for every backend.
RUNS = [("reference", "mean"), ("reference", "none")]
if os.environ.get("TRITON_INTERPRET") == "1":
    RUNS.append(("triton", "mean"))


def global_case(rows, seed=0):
    """The whole job's inputs, identical on every rank: rows[r] batch rows on rank r."""
    g = torch.Generator().manual_seed(seed)
    b = sum(rows)
    x = torch.randn(b, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5
    bias = torch.randn(V, generator=g)
    tags = torch.randint(0, V, (b, K), generator=g)
    tags = torch.where(torch.rand(b, K, generator=g) < 0.7, tags, -1)
    tags[0] = -1               # a row with no valid tag
    tags[1, :2] = V - 1        # a duplicate, and the last class
    grad_rows = torch.randn(b, generator=g)
    return x, weight, bias, tags, grad_rows


def run_ranks(job, world, tmp_path, *args):
    """job(rank, world, out_dir, *args) on `world` gloo ranks; raises if any rank raises or hangs."""
    spawn_ranks(job, world, str(tmp_path), str(tmp_path), *args, timeout_s=TIMEOUT_S)


def _rows(world):
    # Uneven local batches where the world size allows: 3 ranks hold 5, 4 and 3 rows.
    return [5, 4, 3] if world == 3 else [4] * world


def _parallel_job(rank, world, out_dir):
    rows = _rows(world)
    x, weight, bias, tags, grad_rows = global_case(rows)
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    start, stop = vocab_slices(V, world)[rank]
    out = {}
    for backend, reduction in RUNS:
        xx = x[lo:hi].clone().requires_grad_()
        ww = weight[start:stop].clone().requires_grad_()
        bb = bias[start:stop].clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss, lse = hashtag_ce(xx, ww, tags[lo:hi], None, bb, reduction=reduction, return_lse=True,
                                   process_group=dist.group.WORLD, backend=backend,
                                   **(OPTIONS if reduction == "mean" else {}))
        loss.backward(None if reduction == "mean" else grad_rows[lo:hi])
        out[backend, reduction] = dict(loss=loss.detach(), lse=lse, dx=xx.grad, dw=ww.grad, db=bb.grad,
                                       saved=sum(saved))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_vocab_parallel_matches_one_process(world, tmp_path):
    run_ranks(_parallel_job, world, tmp_path)
    rows = _rows(world)
    x, weight, bias, tags, grad_rows = global_case(rows)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    slices = vocab_slices(V, world)
    for reduction in ("mean", "none"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        loss, lse = hashtag_ce(*leaves[:2], tags, None, leaves[2], reduction=reduction, return_lse=True,
                               backend="reference", **(OPTIONS if reduction == "mean" else {}))
        loss.backward(None if reduction == "mean" else grad_rows)
        for backend in [b for b, r in RUNS if r == reduction]:
            got = [res[backend, reduction] for res in results]

            def close(name, actual, expected):
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{backend} {reduction} {name} on {world} ranks: {m}")

            if reduction == "mean":
                for g in got:
                    close("loss", g["loss"], loss.detach())
            else:
                close("loss", torch.cat([g["loss"] for g in got]), loss.detach())
            close("lse", torch.cat([g["lse"] for g in got]), lse)
            close("dx", torch.cat([g["dx"] for g in got]), leaves[0].grad)
            close("dW", torch.cat([g["dw"] for g in got]), leaves[1].grad)
            close("db", torch.cat([g["db"] for g in got]), leaves[2].grad)
            for r, g in enumerate(got):
                # Per-rank memory: the slice's gradient, and nothing saved for backward beyond
                # the gathered inputs (x, tags, weights), this rank's slice of W and b, and lse.
                v_r = slices[r][1] - slices[r][0]
                assert g["dw"].shape == (v_r, D)
                b = sum(rows)
                assert g["saved"] == b * D + v_r * D + v_r + 2 * b * K + b


def _head_outputs(head, rank, world):
    """The head's eval loss and lse on one 12-row global batch, split evenly over the ranks."""
    x, _, _, tags, _ = global_case([12], seed=3)
    lo, hi = 12 // world * rank, 12 // world * (rank + 1)
    head.eval()
    with torch.no_grad():
        loss, lse = head(x[lo:hi], tags[lo:hi], return_lse=True)
    return loss, lse


def _save_job(rank, world, out_dir):
    torch.manual_seed(10 + rank)
    group = dist.group.WORLD
    head = HashtagHead(D, V, process_group=group, **OPTIONS)
    assert head.weight.shape[0] in (V // world, V // world + 1)
    state = head.state_dict()  # a collective: every rank
    loss, lse = _head_outputs(head, rank, world)
    lses = [torch.empty(12 // world) for _ in range(world)]
    dist.all_gather(lses, lse)
    if rank == 0:
        torch.save(dict(state=state, loss=loss, lse=torch.cat(lses)), os.path.join(out_dir, "saved.pt"))


def _load_job(rank, world, out_dir, checkpoint):
    head = HashtagHead(D, V, process_group=dist.group.WORLD, **OPTIONS)
    head.load_state_dict(torch.load(checkpoint)["state"])
    loss, lse = _head_outputs(head, rank, world)
    lses = [torch.empty(12 // world) for _ in range(world)]
    dist.all_gather(lses, lse)
    if rank == 0:
        torch.save(dict(loss=loss, lse=torch.cat(lses)), os.path.join(out_dir, "loaded.pt"))


def test_checkpoint_reshards_from_4_ranks_to_2_and_1(tmp_path):
    (tmp_path / "save").mkdir()
    (tmp_path / "load").mkdir()
    run_ranks(_save_job, 4, tmp_path / "save")
    checkpoint = tmp_path / "save" / "saved.pt"
    saved = torch.load(checkpoint)
    assert saved["state"]["weight"].shape == (V, D) and saved["state"]["bias"].shape == (V,)
    run_ranks(_load_job, 2, tmp_path / "load", str(checkpoint))
    at_two = torch.load(tmp_path / "load" / "loaded.pt")
    head = HashtagHead(D, V, **OPTIONS)
    head.load_state_dict(saved["state"])
    at_one = _head_outputs(head, 0, 1)
    for loss, lse in ((at_two["loss"], at_two["lse"]), at_one):
        torch.testing.assert_close(loss, saved["loss"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, saved["lse"], atol=1e-5, rtol=1e-5)


def _sampled_job(rank, world, out_dir):
    torch.manual_seed(20 + rank)
    rows = [4] * world
    x, weight, bias, tags, _ = global_case(rows, seed=5)
    head = HashtagHead(D, V, process_group=dist.group.WORLD, sample_fraction=0.3)
    head.load_state_dict(dict(weight=weight, bias=bias))
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    loss = head(x[lo:hi], tags[lo:hi])
    loss.backward()
    kept = head.weight.grad.abs().sum(1).nonzero().squeeze(1) + head.vocab_start
    torch.save(dict(loss=loss.detach(), kept=kept, dw=head.weight.grad), os.path.join(out_dir, f"rank{rank}.pt"))


def test_sampled_mode_across_ranks(tmp_path):
    world = 2
    run_ranks(_sampled_job, world, tmp_path)
    x, weight, bias, tags, _ = global_case([4] * world, seed=5)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    positives = tags[tags >= 0].unique()
    kept = torch.cat([res["kept"] for res in results])
    for (start, stop), res in zip(vocab_slices(V, world), results):
        mine = positives[(positives >= start) & (positives < stop)]
        assert res["kept"].numel() == max(mine.numel(), round(0.3 * (stop - start)))
        assert torch.isin(mine, res["kept"]).all()
    # The sampled loss is the full softmax over the kept classes, whatever rank holds them.
    position = torch.full((V,), -1, dtype=torch.long)
    position[kept] = torch.arange(kept.numel())
    w = weight[kept].clone().requires_grad_()
    loss = hashtag_ce(x, w, torch.where(tags >= 0, position[tags.clamp_min(0)], -1), bias=bias[kept],
                      backend="reference")
    loss.backward()
    dw = torch.zeros(V, D)
    dw[kept] = w.grad
    for res in results:
        torch.testing.assert_close(res["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([res["dw"] for res in results]), dw, atol=1e-5, rtol=1e-5)


BAD_CASES = ["tag_too_large_everywhere", "bad_tag_on_rank_1", "tag_past_global_vocab_on_rank_0",
             "dtype_mismatch_everywhere", "ranks_disagree_on_D", "non_contiguous_on_rank_1"]


def _bad_job(rank, world, out_dir):
    group = dist.group.WORLD
    x, weight, bias, tags, _ = global_case([4] * world)
    start, stop = vocab_slices(V, world)[rank]
    x, weight, bias, tags = x[4 * rank:4 * rank + 4], weight[start:stop], bias[start:stop], tags[4 * rank:4 * rank + 4]
    messages = {}
    for case in BAD_CASES:
        args = dict(x=x, weight=weight, tags=tags.clone(), bias=bias)
        if case == "tag_too_large_everywhere":
            args["tags"][2, 0] = 1000
        elif case == "bad_tag_on_rank_1" and rank == 1:
            args["tags"][2, 0] = -5
        elif case == "tag_past_global_vocab_on_rank_0" and rank == 0:
            args["tags"][3, 1] = V  # inside no slice; only the exchange can tell
        elif case == "dtype_mismatch_everywhere":
            args["weight"] = weight.double()
        elif case == "ranks_disagree_on_D" and rank == 1:
            args["x"], args["weight"] = torch.randn(4, D + 1), torch.randn(stop - start, D + 1)
        elif case == "non_contiguous_on_rank_1" and rank == 1:
            args["x"] = x.t().contiguous().t()
        try:
            hashtag_ce(args.pop("x"), args.pop("weight"), args.pop("tags"), **args, process_group=group,
                       backend="triton")
            messages[case] = None
        except (TypeError, ValueError) as e:
            messages[case] = f"{type(e).__name__}: {e}"
    # The group is still usable: no rank was left inside a collective.
    messages["after"] = float(hashtag_ce(x, weight, tags, bias=bias, process_group=group, backend="reference"))
    torch.save(messages, os.path.join(out_dir, f"rank{rank}.pt"))


def test_bad_input_raises_on_every_rank_without_hanging(tmp_path):
    run_ranks(_bad_job, 2, tmp_path)
    m0, m1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for m in (m0, m1):
        assert "tags must be < the vocabulary size 101" in m["tag_too_large_everywhere"]
        assert "rank(s) [0] have tags up to 101" in m["tag_past_global_vocab_on_rank_0"]
        assert "TypeError: hashtag_ce: weight must have x's dtype" in m["dtype_mismatch_everywhere"]
        assert "disagree on the feature size D: [24, 25]" in m["ranks_disagree_on_D"]
        assert m["after"] > 0
    assert "tags must be class ids >= 0 or -1 for padding, found -5" in m1["bad_tag_on_rank_1"]
    assert "rank(s) [1] of 2 rejected their inputs" in m0["bad_tag_on_rank_1"]
    assert "x must be contiguous" in m1["non_contiguous_on_rank_1"]
    assert "rank(s) [1] of 2 rejected their inputs" in m0["non_contiguous_on_rank_1"]

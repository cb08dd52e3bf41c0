"""hashtag_ce in one process: the reference against the formula, the Triton kernels (CPU
interpreter) against the reference, input checks, dispatch, tracing, and HashtagHead."""

import os

import pytest
import torch

from engine.heads import HashtagHead
from engine.kernels import hashtag_ce as triton_kernels
from engine.ops import BackendUnavailableError, hashtag_ce
from engine.ops import REGISTRY
from engine.ops.hashtag_ce import Layout, _DenseKernels, _HashtagCEFunction, target_weights

SHAPES = [  # B, D, V, K
    (13, 40, 300, 3),   # V, D not multiples of the tiles (32 classes, 16 features); several vocabulary splits
    (20, 17, 45, 8),    # two batch tiles (16 rows); K = 8
    (5, 33, 257, 1),    # K = 1: hard targets; one class past a tile boundary
]
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.float16, 1e-3, 1e-2), (torch.bfloat16, 5e-3, 3e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Triton takes CPU tensors only in its interpreter (which the conftest turns on without a GPU).
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton runs CPU tensors only with TRITON_INTERPRET=1")
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]


def skip_unsupported(device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 tl.dot is wrong in Triton's CPU interpreter; covered on GPU")


@pytest.fixture(autouse=True)
def _small_backward_chunks(monkeypatch):
    # A few KiB of G scratch: the test vocabularies span several backward chunks.
    monkeypatch.setattr(triton_kernels, "GRAD_SCRATCH_BYTES", 2048)


def make_case(b, d, v, k, dtype=torch.float32, logit_scale=1.0, seed=0, device="cpu"):
    """Inputs with the awkward rows: one with no valid tag, one with a duplicated tag, rows
    with fewer than K tags, and the first and last classes of the vocabulary as targets."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, d, generator=g) * logit_scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    tags = torch.randint(0, v, (b, k), generator=g)
    valid = torch.rand(b, k, generator=g) < 0.7
    valid[:, 0] = True
    tags = torch.where(valid, tags, -1)
    tags[0] = -1
    tags[1, 0], tags[2 % b, 0] = v - 1, 0
    if k > 1:
        tags[1, 1] = v - 1
    tag_weights = torch.rand(b, k, generator=g) + 0.1
    return tuple(t.to(device) for t in (x, weight, bias, tags, tag_weights))


def run(fn_backend, x, weight, bias, tags, tag_weights=None, grad_rows=None, upcast=False, **options):
    """Loss, lse and the gradients of x, weight and bias (upcast: on fp32 copies of the inputs)."""
    leaves = [t.detach().clone().float() if upcast else t.detach().clone() for t in (x, weight, bias)]
    for t in leaves:
        t.requires_grad_()
    loss, lse = hashtag_ce(leaves[0], leaves[1], tags, tag_weights, leaves[2], return_lse=True,
                           backend=fn_backend, **options)
    loss.backward(grad_rows if grad_rows is not None else None)
    return [loss.detach(), lse] + [t.grad for t in leaves]


def assert_all_close(actual, expected, atol, rtol):
    for name, a, e in zip(["loss", "lse", "dx", "dweight", "dbias"], actual, expected):
        torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_reference_is_the_formula():
    """loss_i = (sum q'_i) lse_i - q'_i . z_i + z_loss lse_i^2 with q' = (1 - eps) q + eps / V, in float64."""
    x, weight, bias, tags, tag_weights = make_case(7, 6, 11, 3)
    x, weight, bias = x.double(), weight.double(), bias.double()
    eps, lam = 0.2, 0.01
    z = x @ weight.t() + bias
    q = torch.zeros_like(z)
    for i in range(7):
        for j in range(3):
            if tags[i, j] >= 0:
                q[i, tags[i, j]] += tag_weights[i, j]
    smoothed = (1 - eps) * q + eps / 11
    lse = torch.logsumexp(z, 1)
    expected = smoothed.sum(1) * lse - (smoothed * z).sum(1) + lam * lse ** 2
    valid = (tags >= 0).any(1)
    expected = torch.where(valid, expected, 0.0)
    per_row = hashtag_ce(x, weight, tags, tag_weights, bias, label_smoothing=eps, z_loss=lam, reduction="none",
                         backend="reference")
    torch.testing.assert_close(per_row, expected)
    mean = hashtag_ce(x, weight, tags, tag_weights, bias, label_smoothing=eps, z_loss=lam, backend="reference")
    torch.testing.assert_close(mean, expected.sum() / valid.sum())
    # Default weights: 1/k over the valid tags, duplicates adding up.
    default = target_weights(tags, None)
    assert torch.allclose(default.sum(1), valid.float())


def test_vocab_parallel_function_gradients_in_float64():
    """The backward formula (softmax coefficient with smoothing and z-loss, duplicates, empty
    rows) against finite differences, through the dense per-slice kernels."""
    x, weight, bias, tags, tag_weights = make_case(6, 5, 9, 3)
    x, weight, bias = (t.double().requires_grad_() for t in (x, weight, bias))
    tw = target_weights(tags, tag_weights)
    layout = Layout(0, (6,), (9,))

    def loss(x, weight, bias, mean):
        return _HashtagCEFunction.apply(x, weight, bias, tags, tw, 0.1, 0.01, mean, None, layout, _DenseKernels)[0]

    assert torch.autograd.gradcheck(lambda *a: loss(*a, True), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: loss(*a, False), (x, weight, bias))
    ref = hashtag_ce(x, weight, tags, tag_weights, bias, label_smoothing=0.1, z_loss=0.01, backend="reference")
    torch.testing.assert_close(loss(x, weight, bias, True), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, dtype, atol, rtol, device):
    skip_unsupported(device, dtype)
    x, weight, bias, tags, tag_weights = make_case(*shape, dtype=dtype, device=device)
    options = dict(label_smoothing=0.1, z_loss=1e-3)
    got = run("triton", x, weight, bias, tags, tag_weights, **options)
    expected = run("reference", x, weight, bias, tags, tag_weights, upcast=True, **options)
    assert got[2].dtype == dtype and got[3].dtype == dtype and got[4].dtype == dtype
    assert_all_close(got, expected, atol, rtol)


@needs_interpreter
@pytest.mark.parametrize("options", [dict(), dict(reduction="none"), dict(z_loss=1e-2, reduction="none")],
                         ids=["plain", "none", "zloss_none"])
def test_triton_options_default_weights_no_bias(options):
    x, weight, _, tags, _ = make_case(11, 24, 70, 4, seed=1)
    grad_rows = torch.randn(11) if options.get("reduction") == "none" else None
    leaves = []
    for backend in ("triton", "reference"):
        xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, lse = hashtag_ce(xx, ww, tags, return_lse=True, backend=backend, **options)
        loss.backward(grad_rows)
        leaves.append([loss.detach(), lse, xx.grad, ww.grad])
    for a, e in zip(*leaves):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_triton_large_logits(dtype, atol, rtol, device):
    """Logits in the hundreds: exp overflows without the running max (fp32 at 88, fp16 at 11)."""
    skip_unsupported(device, dtype)
    x, weight, bias, tags, tag_weights = make_case(9, 32, 100, 2, dtype=dtype, logit_scale=60.0, device=device)
    got = run("triton", x, weight, bias, tags, tag_weights)
    expected = run("reference", x, weight, bias, tags, tag_weights, upcast=True)
    assert expected[1].abs().max() > 100
    assert all(torch.isfinite(t).all() for t in got)
    assert_all_close(got, expected, atol * 10, rtol)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "reference"])
def test_no_valid_rows_give_zero_loss_and_gradients(backend):
    x, weight, bias, tags, _ = make_case(4, 16, 40, 2)
    got = run(backend, x, weight, bias, torch.full_like(tags, -1), label_smoothing=0.1)
    assert got[0].item() == 0.0
    for grad in got[2:]:
        assert torch.count_nonzero(grad) == 0


@needs_interpreter
def test_frozen_inputs_skip_their_gradients():
    x, weight, bias, tags, _ = make_case(6, 16, 50, 2)
    w = weight.clone().requires_grad_()
    hashtag_ce(x, w, tags, bias=bias, backend="triton").backward()
    w_ref = weight.clone().requires_grad_()
    hashtag_ce(x, w_ref, tags, bias=bias, backend="reference").backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-4)


def _bad(case, **changes):
    x, weight, bias, tags, tag_weights = case
    args = dict(x=x, weight=weight, tags=tags, tag_weights=tag_weights, bias=bias)
    args.update(changes)
    return args


BAD_INPUTS = [
    (lambda c: _bad(c, tags=torch.where(c[3] == c[3][1, 0], 30, c[3])), ValueError,
     "tags must be < the vocabulary size 30"),
    (lambda c: _bad(c, tags=torch.where(c[3] < 0, -2, c[3])), ValueError, r"tags must be class ids >= 0 or -1"),
    (lambda c: _bad(c, tag_weights=-c[4]), ValueError, "tag_weights must be finite and >= 0"),
    (lambda c: _bad(c, tag_weights=c[4][:, :1]), ValueError, "tag_weights must have tags' shape"),
    (lambda c: _bad(c, weight=torch.randn(30, 9)), ValueError, r"weight must be \[V, 8\] to match x's feature size"),
    (lambda c: _bad(c, weight=c[1].half()), TypeError, "weight must have x's dtype torch.float32"),
    (lambda c: _bad(c, bias=c[2].double()), TypeError, "bias must have x's dtype"),
    (lambda c: _bad(c, bias=c[2][:-1]), ValueError, r"bias must have shape \[30\]"),
    (lambda c: _bad(c, tags=c[3].float()), TypeError, "tags must be int32 or int64"),
    (lambda c: _bad(c, tags=c[3][:-1]), ValueError, r"tags must be \[B, K\] with B=5"),
    (lambda c: _bad(c, x=c[0].t().contiguous().t()), ValueError, "x must be contiguous"),
    (lambda c: _bad(c, weight=torch.randn(8, 30).t()), ValueError, "weight must be contiguous"),
    (lambda c: _bad(c, tags=c[3].t().contiguous().t()), ValueError, "tags must be contiguous"),
    (lambda c: _bad(c, bias=c[2].to("meta")), ValueError, "bias is on meta but x is on cpu"),
    (lambda c: _bad(c, tags=c[3].to("meta")), ValueError, "tags is on meta but x is on cpu"),
    (lambda c: _bad(c, x=c[0].long()), TypeError, "x must be float32, float16 or bfloat16"),
    (lambda c: _bad(c, x=c[0][0]), ValueError, r"x must be 2-D \[B, D\]"),
]


@pytest.mark.parametrize("make, error, message", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_is_named(make, error, message):
    args = make(make_case(5, 8, 30, 3))
    with pytest.raises(error, match=message):
        hashtag_ce(args.pop("x"), args.pop("weight"), args.pop("tags"), **args, backend="triton")


@pytest.mark.parametrize("options, message", [
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(z_loss=-1.0), "z_loss must be finite and >= 0"),
    (dict(reduction="sum"), "reduction must be one of"),
])
def test_bad_option_is_named(options, message):
    x, weight, bias, tags, _ = make_case(5, 8, 30, 3)
    with pytest.raises(ValueError, match=message):
        hashtag_ce(x, weight, tags, bias=bias, **options)


def test_auto_dispatch_on_cpu_picks_reference_and_says_why():
    x, weight, bias, tags, _ = make_case(5, 8, 30, 3)
    hashtag_ce(x, weight, tags, bias=bias)
    decision = REGISTRY["hashtag_ce"].last_decision
    assert decision.backend == "reference" and not decision.forced
    assert "triton" in decision.skipped  # CPU tensors: picked only when forced


def test_forced_triton_refuses_bfloat16_in_the_interpreter():
    x, weight, bias, tags, _ = make_case(5, 8, 30, 3, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        hashtag_ce(x, weight, tags, bias=bias, backend="triton")
    hashtag_ce(x, weight, tags, bias=bias, backend="reference")


@needs_interpreter
def test_custom_ops_fake_implementations():
    x, weight, bias, tags, tag_weights = make_case(6, 16, 40, 2)
    tw = target_weights(tags, tag_weights)
    torch.library.opcheck(triton_kernels.hashtag_ce_fwd_triton, (x, weight, bias, tags, tw, True))
    stats = triton_kernels.forward(x, weight, bias, tags, tw, True)
    lse = stats[0] + stats[1].log()
    coef = torch.rand(3, 6)
    torch.library.opcheck(triton_kernels.hashtag_ce_bwd_triton, (x, weight, None, tags, tw, lse, coef, True, False))


@needs_interpreter
def test_traces_under_torch_compile():
    """The fake implementations let torch.compile trace the fused path, forward and backward."""
    torch._dynamo.reset()
    x, weight, bias, tags, tag_weights = make_case(6, 16, 40, 2)
    tw = target_weights(tags, tag_weights)
    layout = Layout(0, (6,), (40,))

    def step(x, weight, bias):
        return REGISTRY["hashtag_ce"].backends["triton"].impl(x, weight, tags, tw, bias, label_smoothing=0.1, layout=layout)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    compiled(*leaves).backward()
    expected = run("reference", x, weight, bias, tags, tag_weights, label_smoothing=0.1)
    for got, want in zip([t.grad for t in leaves], expected[2:]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_head_state_dict_is_the_full_torchvision_fc():
    torch.manual_seed(0)
    head = HashtagHead(16, 50)
    state = head.state_dict()
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (50, 16)
    fresh = HashtagHead(16, 50)
    fresh.load_state_dict(state)
    x, _, _, tags, _ = make_case(4, 16, 50, 2)
    torch.testing.assert_close(fresh(x, tags), head(x, tags))
    with pytest.raises(RuntimeError, match="the checkpoint holds 50 classes, this HashtagHead 60"):
        HashtagHead(16, 60).load_state_dict(state)


def test_head_counts_rows_without_tags_and_casts_to_the_features_dtype():
    torch.manual_seed(0)
    head = HashtagHead(16, 50)
    x, _, _, tags, _ = make_case(6, 16, 50, 2)
    head(x.half(), tags).backward()
    assert head.weight.grad.dtype == torch.float32
    head(x, tags)
    assert int(head.empty_rows) == 2
    head.eval()
    head(x, tags)
    assert int(head.empty_rows) == 2


def test_head_sampled_mode():
    """All positives are kept, plus negatives up to the fraction; only kept rows get gradient;
    the sampled loss is the softmax over the kept classes; fraction 1 is the full softmax."""
    torch.manual_seed(0)
    v = 200
    head = HashtagHead(16, v, sample_fraction=0.25)
    x, _, _, tags, _ = make_case(6, 16, v, 3)
    x.requires_grad_()
    loss = head(x, tags)
    loss.backward()
    kept = head.weight.grad.abs().sum(1).nonzero().squeeze(1)
    positives = tags[tags >= 0].unique()
    assert kept.numel() == 50 and torch.isin(positives, kept).all()
    assert torch.count_nonzero(head.bias.grad) == 50
    position = torch.full((v,), -1, dtype=torch.long)
    position[kept] = torch.arange(kept.numel())
    sub_tags = torch.where(tags >= 0, position[tags.clamp_min(0)], -1)
    # The same loss and every gradient (the trunk's included) as the plain softmax over the kept rows.
    x_ref = x.detach().clone().requires_grad_()
    w_ref = head.weight[kept].detach().clone().requires_grad_()
    b_ref = head.bias[kept].detach().clone().requires_grad_()
    expected = hashtag_ce(x_ref, w_ref, sub_tags, bias=b_ref)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(head.weight.grad[kept], w_ref.grad)
    torch.testing.assert_close(head.bias.grad[kept], b_ref.grad)
    head.eval()
    full = head(x, tags)
    assert full > loss
    head.train()
    head.sample_fraction = 1.0
    torch.testing.assert_close(head(x, tags), full)


def test_head_sampling_every_class_is_the_full_softmax():
    """A fraction that rounds to the whole vocabulary keeps every class (positives first,
    a permutation): the loss and every gradient are the full softmax's."""
    v = 20
    x, weight, bias, tags, tag_weights = make_case(7, 12, v, 3)
    grads = []
    losses = []
    for fraction in (0.99, 1.0):
        head = HashtagHead(12, v, sample_fraction=fraction, label_smoothing=0.1)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        xs = x.clone().requires_grad_()
        loss = head(xs, tags, tag_weights)
        loss.backward()
        losses.append(loss.detach())
        grads.append((xs.grad, head.weight.grad, head.bias.grad))
    torch.testing.assert_close(losses[0], losses[1])
    for name, sampled, full in zip(["dx", "dweight", "dbias"], *grads):
        torch.testing.assert_close(sampled, full, msg=lambda m: f"{name}: {m}")

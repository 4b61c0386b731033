import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.train.loss import (
    LOSS_DEFAULTS,
    MAX_LOGIT_SCALE,
    BatchLoss,
    chunked_cross_entropy,
    chunked_sigmoid_loss,
    clamp_logit_scale,
    contrastive_loss,
    sharded_contrastive_loss,
    sharded_sigmoid_loss,
    sigmoid_loss,
)


def direct_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> float:
    """The paper's pseudo-code (Figure 3) written out with explicit loops, in float64."""
    n = images.shape[0]
    logits = [[scale * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    loss_i = sum(-logits[i][i] + math.log(sum(math.exp(x) for x in logits[i])) for i in range(n)) / n
    cols = [[logits[i][j] for i in range(n)] for j in range(n)]
    loss_t = sum(-cols[j][j] + math.log(sum(math.exp(x) for x in cols[j])) for j in range(n)) / n
    return (loss_i + loss_t) / 2


def test_loss_equals_direct_computation():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    got = contrastive_loss(images, texts, log_scale).item()
    assert got == pytest.approx(direct_loss(images, texts, 1 / 0.07), rel=1e-12)


def test_loss_is_symmetric_in_images_and_texts():
    torch.manual_seed(1)
    a, b = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    scale = torch.tensor(2.0)
    torch.testing.assert_close(contrastive_loss(a, b, scale), contrastive_loss(b, a, scale))


def test_gathered_features_give_the_global_batch_loss():
    """Two 'ranks' each scoring their local pairs against the gathered batch average to the full loss."""
    torch.manual_seed(2)
    images, texts = F.normalize(torch.randn(8, 4), dim=-1), F.normalize(torch.randn(8, 4), dim=-1)
    scale = torch.tensor(1.5)
    full = contrastive_loss(images, texts, scale)
    halves = [
        contrastive_loss(images[r * 4 : r * 4 + 4], texts[r * 4 : r * 4 + 4], scale, images, texts, r * 4)
        for r in (0, 1)
    ]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full)


def test_logit_scale_clamped_to_ln_100():
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale(p)
    assert p.item() == pytest.approx(math.log(100))
    assert pytest.approx(4.605170186) == MAX_LOGIT_SCALE
    p.data.fill_(3.0)
    clamp_logit_scale(p)
    assert p.item() == 3.0


def direct_sigmoid_loss(images: torch.Tensor, texts: torch.Tensor, t: float, b: float) -> float:
    """SigLIP's loss (Zhai et al. 2023, Algorithm 1 and §3.2) pair by pair, in float64."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = t * float(images[i] @ texts[j]) + b
            total += math.log(1 / (1 + math.exp(-label * logit)))
    return -total / n


def test_sigmoid_loss_equals_direct_computation():
    torch.manual_seed(3)
    images = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    for t, b in ((10.0, -10.0), (3.0, 0.5)):
        log_t, bias = torch.tensor(math.log(t), dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        got = sigmoid_loss(images, texts, log_t, bias).item()
        assert got == pytest.approx(direct_sigmoid_loss(images, texts, t, b), rel=1e-12)


def test_sigmoid_loss_blocks_add_up_to_the_global_batch_loss():
    """Both multi-process forms: texts gathered (with an offset), or passed round in chunks and summed."""
    torch.manual_seed(4)
    images, texts = F.normalize(torch.randn(8, 4), dim=-1), F.normalize(torch.randn(8, 4), dim=-1)
    log_t, bias = torch.tensor(math.log(10.0)), torch.tensor(-2.0)
    full = sigmoid_loss(images, texts, log_t, bias)
    blocks = [slice(0, 4), slice(4, 8)]
    gathered = [sigmoid_loss(images[r], texts, log_t, bias, offset=r.start) for r in blocks]
    torch.testing.assert_close((gathered[0] + gathered[1]) / 2, full)
    for rank, own in enumerate(blocks):
        other = blocks[1 - rank]
        chunked = sigmoid_loss(images[own], texts[own], log_t, bias) + sigmoid_loss(
            images[own], texts[other], log_t, bias, offset=None
        )
        torch.testing.assert_close(chunked, gathered[rank])


def test_sigmoid_loss_trains_temperature_and_bias():
    torch.manual_seed(5)
    images, texts = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    log_t = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    bias = torch.nn.Parameter(torch.tensor(-10.0))
    sigmoid_loss(images, texts, log_t, bias).backward()
    # At b = -10 every pair looks negative: the positives pull the bias up, hard.
    assert bias.grad is not None and bias.grad.item() < -0.5
    assert log_t.grad is not None and torch.isfinite(log_t.grad) and log_t.grad.item() != 0


def separated_pairs(matched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """4 images (unit basis vectors) and their texts: with `matched`, every image's cosine is positive with
    its own text and negative with the others; otherwise the reverse (each text is the opposite vector)."""
    images = torch.eye(4, 8)
    texts = F.normalize(images - 0.3 * (1 - torch.eye(4)) @ images, dim=-1)
    return images, texts if matched else -texts


@pytest.mark.parametrize("matched", [True, False])
def test_temperature_gradient_has_the_sign_that_sharpens_a_right_ranking(matched):
    # Cross-entropy over s * c: d loss / d s = sum_j p_j c_j - c_own per row (and column). When every
    # image's own text has the highest cosine, the softmax mean is below it: raising the scale lowers the
    # loss (gradient < 0); when the own text has the lowest cosine, the gradient is > 0. The log-scale
    # gradient is s times that: the same sign.
    images, texts = separated_pairs(matched)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    contrastive_loss(images, texts, log_scale).backward()
    assert (log_scale.grad.item() < 0) == matched and log_scale.grad.item() != 0
    # Sigmoid: each pair adds -sigmoid(-y z) * y * c to d loss / d s (y = +1 own text, -1 other): all
    # negative when positives have c > 0 and negatives c < 0, all positive in the reverse case.
    log_t, bias = torch.nn.Parameter(torch.tensor(math.log(10.0))), torch.tensor(0.0)
    sigmoid_loss(images, texts, log_t, bias).backward()
    assert (log_t.grad.item() < 0) == matched and log_t.grad.item() != 0


def test_loss_defaults_follow_the_papers():
    assert LOSS_DEFAULTS["contrastive"].init_temperature == 0.07
    assert math.log(LOSS_DEFAULTS["contrastive"].max_logit_scale) == MAX_LOGIT_SCALE
    assert LOSS_DEFAULTS["sigmoid"].init_temperature == 0.1  # t = 10
    assert LOSS_DEFAULTS["sigmoid"].max_logit_scale == math.inf  # SigLIP does not clamp


def features(n: int, dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """n unit image and text features and the log of CLIP's starting scale, all requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    images, texts = (F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1) for _ in range(2))
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    return images.requires_grad_(), texts.requires_grad_(), log_scale.requires_grad_()


def loss_and_grads(loss: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("chunk", [1, 3, 4, 8, 20])  # dividing the 8 columns, not dividing, more than all
def test_chunked_contrastive_loss_and_gradients_are_exact_in_float64(chunk):
    inputs = features(8, 16, torch.float64, seed=6)
    want = loss_and_grads(contrastive_loss(*inputs), inputs)
    got = loss_and_grads(sharded_contrastive_loss(*inputs, rank=0, world=1, chunk=chunk), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [3, 4])
def test_chunked_contrastive_loss_and_gradients_match_in_float32(chunk):
    inputs = features(8, 16, torch.float32, seed=7)
    want = loss_and_grads(contrastive_loss(*inputs), inputs)
    got = loss_and_grads(sharded_contrastive_loss(*inputs, rank=0, world=1, chunk=chunk), inputs)
    # Both sum the same terms in another order. A logit s * q.k (unit vectors, s = 1/0.07) is off by at
    # most s * D * eps, a log-sum-exp over N columns adds N * eps * s; the gradients multiply that error in
    # the softmax by a further s. So every value is within s^2 * (D + N) * eps (~6e-4 for values of
    # order 1..s; a missed block or a wrong label is off by O(1)).
    s, bound = 1 / 0.07, (16 + 8) * torch.finfo(torch.float32).eps
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=s * s * bound)


def test_chunked_cross_entropy_with_an_offset_is_the_cross_entropy():
    """A process's 3 rows against 10 gathered columns, its pairs at columns 5..7, in blocks of 4."""
    queries, keys, log_scale = features(10, 6, torch.float64, seed=8)
    queries_local = queries[5:8]
    want_loss = F.cross_entropy(log_scale.exp() * queries_local @ keys.t(), torch.arange(3) + 5)
    want = loss_and_grads(want_loss, (queries, keys, log_scale))
    got_loss = chunked_cross_entropy(queries_local, keys, log_scale, offset=5, chunk=4)
    got = loss_and_grads(got_loss, (queries, keys, log_scale))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_sharded_losses_with_one_process_are_the_plain_losses():
    images, texts, log_scale = features(6, 5, torch.float64, seed=9)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    assert sharded_contrastive_loss(images, texts, log_scale, 0, 1) == contrastive_loss(
        images, texts, log_scale
    )
    got = sharded_sigmoid_loss(images, texts, log_scale, bias, 0, 1)
    assert got == sigmoid_loss(images, texts, log_scale, bias)


@pytest.mark.parametrize(
    "chunk, offset, message", [(0, 0, "chunk must be"), (2, 8, "labels 8..10 are outside")]
)
def test_chunked_cross_entropy_refuses_bad_arguments(chunk, offset, message):
    queries, keys, log_scale = features(10, 4, torch.float32, seed=10)
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(queries[:3], keys, log_scale, offset=offset, chunk=chunk)


@pytest.mark.parametrize("offset", [2, None])
@pytest.mark.parametrize("chunk", [1, 3, 10, 20])
def test_chunked_sigmoid_loss_and_gradients_are_exact_in_float64(chunk, offset):
    """4 local images against 10 texts (their captions at 2..5, or none of them), in blocks of `chunk`."""
    images, texts, log_scale = features(10, 6, torch.float64, seed=11)
    bias = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    inputs = (images, texts, log_scale, bias)
    local = images[2:6]
    want = loss_and_grads(sigmoid_loss(local, texts, log_scale, bias, offset=offset), inputs)
    got = loss_and_grads(chunked_sigmoid_loss(local, texts, log_scale, bias, offset, chunk), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["contrastive", "sigmoid"])
def test_batch_loss_chunked_or_not_is_the_plain_loss_in_one_process(name):
    images, texts, log_scale = features(8, 6, torch.float64, seed=12)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    inputs = (images, texts, log_scale, bias)
    plain = (
        sigmoid_loss(images, texts, log_scale, bias)
        if name == "sigmoid"
        else contrastive_loss(images, texts, log_scale) + 0 * bias
    )
    want = loss_and_grads(plain, inputs)
    for chunk in (0, 3):
        loss = BatchLoss(name, chunk)(images, texts, log_scale, bias) + 0 * bias
        for g, w in zip(loss_and_grads(loss, inputs), want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)

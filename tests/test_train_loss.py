import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.train.loss import MAX_LOGIT_SCALE, clamp_logit_scale, contrastive_loss


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

"""Class-balanced focal loss (sigmoid form) used to train RQGNN and the GIN baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_balanced_weights(counts: Tensor | list[int], beta: float = 0.999) -> Tensor:
    r"""Per-class weights :math:`w_c = (1-\beta)/(1-\beta^{n_c})`, rescaled to sum to the number of classes.

    Cui et al., "Class-Balanced Loss Based on Effective Number of Samples" (CVPR 2019, arXiv:1901.05555).

    Args:
        counts: samples per class ``n_c`` (the whole training set, as RQGNN's code does).
        beta: effective-number hyperparameter (default: 0.999).

    Shapes:
        counts: (C,) -> (C,).
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if bool((n <= 0).any()):
        raise ValueError(f"every class needs at least one training sample, got counts {n.tolist()}")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * n.numel()).float()


def cb_focal_loss(logits: Tensor, target: Tensor, class_weights: Tensor, gamma: float = 1.5) -> Tensor:
    r"""Class-balanced sigmoid focal loss over one-hot targets, summed and divided by the batch size.

    .. math::
        \ell = \frac{1}{B}\sum_{b,c} w_{y_b}\, m_{bc}\,
        \mathrm{BCE}(z_{bc}, t_{bc}),\qquad m_{bc} = \begin{cases}(1-\sigma(z_{bc}))^\gamma & t_{bc}=1\\
        \sigma(z_{bc})^\gamma & t_{bc}=0\end{cases}

    Both the BCE and the modulator use log-sigmoid forms, so extreme logits (|z| in the hundreds) give
    finite values and gradients; the released code's ``log(1 + exp(-z))`` overflows there.

    Args:
        logits: raw scores ``z``.
        target: class ids in ``0..C-1``.
        class_weights: per-class weights (see ``class_balanced_weights``).
        gamma: focusing parameter (default: 1.5).

    Shapes:
        logits: (B, C); target: (B,); class_weights: (C,) -> scalar.
    """
    t = F.one_hot(target, logits.size(1)).to(logits.dtype)  # (B, C)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    # (1 - sigmoid(z)) = sigmoid(-z): the modulator is exp(gamma * logsigmoid(+-z)).
    signed = torch.where(t > 0, -logits, logits)
    mod = torch.exp(gamma * F.logsigmoid(signed)) if gamma != 0 else torch.ones_like(logits)
    w = class_weights.to(logits.device)[target].unsqueeze(1)  # (B, 1)
    return (w * mod * bce).sum() / logits.size(0)

"""Straight-through Gumbel-softmax sampling of the patch masks (paper Eq. 8-9)."""
import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidArgumentError

# The accepted range of the Gumbel-softmax temperature tau. The paper anneals
# tau from 1 to 0.01; beyond these bounds the relaxed gradient of Eq. 9 is
# either ~1/tau-sized (tiny tau: overflow under autocast) or flat (huge tau:
# no learning signal), and neither is a setting anyone trains with.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4


def check_temperature(tau: float, name: str = 'temperature') -> float:
    """Return ``tau`` as a float if it lies in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.

    Raises:
        InvalidArgumentError: naming ``name`` when ``tau`` is not a real number in range.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (
            math.isfinite(tau) and tau > 0):
        raise InvalidArgumentError(f'{name} must be a finite number > 0, got {tau!r} (tau, '
                                   f'accepted range [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}])')
    if not MIN_TEMPERATURE <= tau <= MAX_TEMPERATURE:
        raise InvalidArgumentError(f'{name} (tau) must lie in [{MIN_TEMPERATURE:g}, '
                                   f'{MAX_TEMPERATURE:g}], got {tau!r}: beyond it the relaxed '
                                   'gradient overflows (tiny tau) or vanishes (huge tau)')
    return float(tau)


def straight_through_gumbel(keep_logit: Tensor, skip_logit: Tensor, tau: float,
                            generator: Optional[torch.Generator] = None,
                            noise_scale: float = 1.0) -> Tensor:
    """Hard binary Gumbel-softmax sample with straight-through gradients.

    Forward: ``1[keep_logit + g1 > skip_logit + g0]`` with i.i.d. Gumbel noise
    (Eq. 8). The decision is taken on the noisy margin itself, not on the
    relaxed probability, so that it does not depend on ``tau`` (the
    Gumbel-max sample is unbiased at every temperature; thresholding
    ``sigmoid(margin / tau)`` at 0.5 rounds to exactly 0.5 for a large
    ``tau`` and would skip everything). Backward: the gradient of the relaxed
    two-way softmax ``sigmoid(margin / tau)`` (Eq. 9). Sampling runs in
    float32 so that the noise ``-log(-log(u))`` stays finite under autocast.

    ``noise_scale`` multiplies the noise (1: the paper; 0: the deterministic
    inference decision ``keep > skip``, still with the relaxed gradient); see
    :class:`~sar_backbones.engine.SARGumbelNoiseHook`.

    Args:
        keep_logit (Tensor): Logits of "refine this patch".
        skip_logit (Tensor): Logits of "skip it", same shape.
        tau (float): Temperature in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.
        generator (torch.Generator, optional): Source of the noise.
        noise_scale (float): Scale of the Gumbel noise (>= 0).

    Returns:
        Tensor: float32 0/1 sample (NaN where a logit is NaN).
    """
    check_temperature(tau)
    keep_logit, skip_logit = keep_logit.float(), skip_logit.float()
    margin = keep_logit - skip_logit
    if noise_scale > 0:
        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.rand((2, ) + keep_logit.shape, device=keep_logit.device,
                             generator=generator).clamp_(tiny, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        margin = margin + noise_scale * (gumbel[1] - gumbel[0])
    # softmax over {skip, keep} of the keep entry == sigmoid of the difference.
    # Its slope s(1-s)/tau stays finite for tau >= MIN_TEMPERATURE: s(1-s) <= 1/4.
    soft_keep = torch.sigmoid(margin / tau)
    return _BinarizeStraightThrough.apply(soft_keep, margin)


class _BinarizeStraightThrough(torch.autograd.Function):
    """``1[margin > 0]`` forward, the gradient of ``soft`` backward.

    Exact 0/1 values from the sign of the noisy margin; NaN passes through so
    that a diverged selector is not hidden as "skip" from the rate loss's
    finiteness check.
    """

    @staticmethod
    def forward(ctx, soft: Tensor, margin: Tensor) -> Tensor:
        hard = (margin > 0).to(soft.dtype)
        return torch.where(torch.isnan(margin), margin, hard)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def deterministic_straight_through(margin: Tensor, tau: float = 1.0) -> Tensor:
    """The noise-free (inference) decision ``1[margin > 0]`` with a relaxed gradient.

    Not in the paper (ours, issue 16): the decision that inference takes
    (Sec. III-A.2, "directly binarized"), made differentiable like Eq. 9
    but without the Gumbel noise: forward ``1[margin > 0]``, backward the
    gradient of ``sigmoid(margin / tau)``. A rate loss on it sees the masks
    of the deployed model; ``tau`` is fixed (not annealed) so that margins
    far from 0 still receive a gradient at the end of training.

    Args:
        margin (Tensor): ``keep - skip`` logits.
        tau (float): Temperature of the relaxation, in
            ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.

    Returns:
        Tensor: float32 0/1 decisions (NaN where the margin is NaN).
    """
    check_temperature(tau, 'deterministic_rate_tau')
    margin = margin.float()
    return _BinarizeStraightThrough.apply(torch.sigmoid(margin / tau), margin)

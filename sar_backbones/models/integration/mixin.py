"""Merge the backbone's activation-rate loss into a task model's losses."""
from typing import Any, Dict

from torch import Tensor


class SARLossMixin:
    """Adds a SAR backbone's auxiliary losses to ``loss()`` of a task model.

    Mix it in *before* the task model class (``class X(SARLossMixin,
    FasterRCNN)``) so that :meth:`loss` runs the parent's loss first and then
    merges :meth:`SARResNet.get_aux_losses`: ``loss_act_rate`` (``lambda *
    L_refine``, with gradient into the mask generators) is optimised because
    its key contains ``loss``; the ``act_rate*`` entries are detached and are
    only logged by mmengine's ``parse_losses``.

    The mixin adds no module, so state-dict keys (and therefore checkpoints)
    are exactly those of the parent class.

    Example:
        >>> from mmdet.models import RetinaNet
        >>> class MyRetinaNet(SARLossMixin, RetinaNet):
        ...     pass
    """

    def loss(self, inputs: Tensor, data_samples: Any) -> Dict[str, Any]:
        """Compute the task losses plus the backbone's activation-rate terms.

        Args:
            inputs (Tensor): The batch of images, shape (N, C, H, W).
            data_samples (list): The task's data samples (ground truth).

        Returns:
            dict[str, Tensor]: The parent's losses updated with the backbone's
            auxiliary entries.
        """
        losses = super().loss(inputs, data_samples)  # type: ignore[misc]
        aux = self.backbone.get_aux_losses()  # type: ignore[attr-defined]
        # A silent overwrite of a task loss would corrupt training; the key
        # names of the backbone are chosen not to collide with any head.
        clash = sorted(set(losses) & set(aux))
        if clash:
            raise KeyError(f'{type(self).__name__}: backbone auxiliary keys '
                           f'{clash} collide with task losses')
        losses.update(aux)
        return losses

"""SAR-ResNeXt: ResNeXt with Spatially Adaptive feature Refinement (Han et al., TIP 2021)."""
from typing import Dict, Optional

from sar_backbones.registry import MODELS
from ..layers.resnext_block import ResNeXtBlockType, resnext_width
from .arguments import InvalidArgumentError, require_int
from .sar_resnet import SARResNet


@MODELS.register_module()
class SARResNeXt(SARResNet):
    """SAR-ResNeXt backbone (e.g. ``SAR-ResNeXt-50 32x4d G2s2a2b1``).

    :class:`SARResNet` built from ResNeXt bottlenecks: mmdet's ``ResNeXt``
    contract (``depth``, ``groups`` = cardinality, ``base_width``) plus every
    option of :class:`SARResNet`. Outputs have ResNeXt's strides (4/8/16/32)
    and widths (256/512/1024/2048 for ``base_channels=64``).

    How the authors built it (``yizenghan/sarNet``,
    ``models/sar_resnext_1attFuse.py``) and what follows from it:

    * refine branch (full resolution, width ``beta*C``, ``G`` mask groups):
      both 1x1 convs are grouped by ``G`` and the 3x3 conv by the
      cardinality, a multiple of ``G``, so that mask group ``g`` owns a
      contiguous block of ``cardinality/G`` cardinality groups; the masks
      act on the block input and on both hidden activations, exactly as in
      SAR-ResNet (so the sparse path stays exact);
    * base branch (``1/s`` resolution, width ``C/alpha``): plain ResNeXt
      bottlenecks of the same cardinality whose middle width follows
      ResNeXt's rule at ``C/alpha`` (for 32x4d and ``alpha=2``: 64 channels
      in 32 groups at stage 1, as in the authors' model);
    * transitions and stage 4: ResNeXt bottlenecks (the authors' "fusion"
      blocks and ``layer4``).

    Where the authors' code is silent or specific to their ImageNet
    classifier, SAR-ResNet's rules apply: the stage layout (entry, base,
    selectors, refine, alignments, fusion gate, exit), the region selector,
    the ResNet-D shortcuts, ``base_stride`` 2 for stage 3, the block counts
    of mmdet's ResNeXt (depth 101: 3/4/23/3, where the authors' file lists
    4/8/18/3) and the initialisation (the authors zero the last norm of the
    base blocks only, as SAR-ResNet's ``zero_init_residual`` does).

    Args:
        depth (int): 50 or 101.
        groups (int): Cardinality of the 3x3 convolutions (mmdet's
            ``groups``; the ``32`` of ``32x4d``). Must be a multiple of
            ``mask_groups``. Defaults to 32 (mmdet's default 1 is a plain
            ResNet: use :class:`SARResNet`).
        base_width (int): Width of each cardinality group at
            ``base_channels`` (the ``4`` of ``32x4d``). Defaults to 4.
        mask_groups (int): ``G``, channel groups of the refine branch, each
            with its own mask. Defaults to 2. (``groups`` is the
            cardinality here, so SAR-ResNet's deprecated alias does not
            exist for this class.)
        width_per_group (int, optional): mmpretrain's name of ``base_width``.
        **kwargs: Every other option of :class:`SARResNet` (``base_stride``
            ``s``, ``alpha``, ``beta``, ``patch_grid``/``patch_size`` ``K``,
            ``target_rate`` ``t``, ``strides``, ``dilations``,
            ``out_indices``, ``frozen_stages``, ``norm_eval``, ...).

    Example:
        >>> import torch
        >>> from sar_backbones.models import SARResNeXt
        >>> model = SARResNeXt(depth=50, groups=32, base_width=4, mask_groups=2).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 224, 224))]
        [(1, 256, 56, 56), (1, 512, 28, 28), (1, 1024, 14, 14), (1, 2048, 7, 7)]
    """

    resnext_stage_blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

    def __init__(self, depth: int, groups: int = 32, base_width: int = 4,
                 mask_groups: int = 2, width_per_group: Optional[int] = None,
                 **kwargs) -> None:
        if isinstance(depth, bool) or depth not in self.resnext_stage_blocks:
            raise KeyError(f'invalid depth {depth!r} for SARResNeXt; choose an int from '
                           f'{sorted(self.resnext_stage_blocks)}')
        if width_per_group is not None:
            if base_width not in (4, width_per_group):
                raise InvalidArgumentError(
                    f'base_width={base_width!r} and width_per_group={width_per_group!r} (its '
                    "mmpretrain name) differ; give one of them")
            base_width = width_per_group
        cardinality = require_int(groups, 'groups (ResNeXt cardinality)', 1)
        base_width = require_int(base_width, 'base_width', 1)
        mask_groups = require_int(mask_groups, 'mask_groups (G)', 1)
        if cardinality % mask_groups:
            raise InvalidArgumentError(
                f'groups (cardinality, {cardinality}) must be a multiple of mask_groups '
                f'(G={mask_groups}): each mask group owns whole cardinality groups of the '
                'refine 3x3 convs')
        base_channels = kwargs.get('base_channels', 64)
        base_channels = require_int(base_channels, 'base_channels', 1)
        self._check_widths(cardinality, base_width, base_channels, kwargs.get('alpha', 2),
                           kwargs.get('beta', 1))
        block = ResNeXtBlockType(cardinality, base_width, base_channels)
        # SARResNet builds every block from arch_settings[depth]; the bound
        # ResNeXt block type is per instance (plain attribute, set before
        # nn.Module.__init__ runs inside SARResNet.__init__).
        self.arch_settings = {depth: (block, self.resnext_stage_blocks[depth])}
        self.cardinality = cardinality
        self.base_width = base_width
        super().__init__(depth=depth, mask_groups=mask_groups, **kwargs)

    @staticmethod
    def _check_widths(cardinality: int, base_width: int, base_channels: int, alpha, beta) -> None:
        """Every ResNeXt block keeps at least one channel per cardinality group."""
        if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 1:
            return  # SARResNet names the bad alpha
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            return  # SARResNet names the bad beta
        for stage in range(3):
            width = base_channels * 2**stage * 4
            for label, branch_width in (('base branch C/alpha', width // alpha),
                                        ('refine branch beta*C', int(width * beta))):
                if resnext_width(branch_width, cardinality, base_width, base_channels) < 1:
                    raise InvalidArgumentError(
                        f'SAR stage {stage + 1}: the {label} ({branch_width} channels) leaves '
                        f'no middle channel for groups={cardinality} x base_width={base_width} '
                        f'(ResNeXt rule floor(width/4 * base_width/base_channels) * groups); '
                        'lower alpha or raise base_channels')

    def architecture(self) -> Dict[str, object]:
        """:meth:`SARResNet.architecture` plus the cardinality and base width."""
        record = super().architecture()
        record.update(type='SARResNeXt', groups=self.cardinality, base_width=self.base_width)
        return record

# RetinaNet + FPN, 1x (12 epochs) on COCO with an ImageNet-pretrained
# SAR-ResNet50 G2s2a2b1 (t=0.5) backbone: the paper's first detection setting
# (Han et al., TIP 2021, Sec. IV-E). Everything but the backbone is mmdet's
# retinanet_r50_fpn_1x_coco.py (800x1333, SGD lr 0.01 for 16 images).
#
# Baseline: mmdet RetinaNet R50-FPN 1x, 36.5 box AP (mmdet 3.3.0 model zoo,
# configs/retinanet/metafile.yml). Test/val logs
# `act_rate` and `effective_gflops` (backbone) next to coco/bbox_mAP.
#
# Backbone weights: see configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnet50-g2s2a2b1_in1k_backbone.pth
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', '../_base_/sar_hooks.py']

model = dict(
    type='sar_backbones.SARRetinaNet',
    backbone=dict(
        _delete_=True,
        type='sar_backbones.SARResNet',
        depth=50,
        mask_groups=2,
        base_stride=2,
        alpha=2,
        beta=1,
        # Fixed region size in feature pixels for variable detection inputs
        # (what the 14/7/2 grid gives at 224 input).
        patch_grid=None,
        patch_size=(4, 4, 7),
        target_rate=0.5,
        # lambda as in ImageNet pretraining.
        rate_loss_weight=0.5,
        rate_loss='batch',
        out_indices=(0, 1, 2, 3),
        # As mmdet's ResNet-50 baseline: stem and stage 1 frozen, BN frozen.
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/sar-resnet50-g2s2a2b1_in1k_backbone.pth')))

# Faster R-CNN + FPN, 1x (12 epochs) on COCO with an ImageNet-pretrained
# SAR-ResNeXt-101 32x4d G2s2a2b1 (t=0.5) backbone. Everything but the
# backbone is mmdet's faster-rcnn_x101-32x4d_fpn_1x_coco.py (800x1333, SGD
# lr 0.02 for 16 images); the SAR settings are those of the SAR-ResNet50
# detector (faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py).
#
# Baseline: mmdet Faster R-CNN X101-32x4d-FPN 1x, 41.2 box AP (mmdet 3.3.0
# model zoo, configs/faster_rcnn/metafile.yml). Test/val logs `act_rate` and
# `effective_gflops` (backbone) next to coco/bbox_mAP.
#
# The backbone weights come from ImageNet pretraining, converted to a
# backbone-only checkpoint:
#   tools/dist_train.sh configs/sar_resnext/sar-resnext101-32x4d-g2s2a2b1-t0.5_8xb32_in1k.py 8
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnext101-32x4d-g2s2a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnext101-32x4d-g2s2a2b1_in1k_backbone.pth
_base_ = ['mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py', '../_base_/sar_hooks.py']

model = dict(
    type='sar_backbones.SARFasterRCNN',
    backbone=dict(
        _delete_=True,
        type='sar_backbones.SARResNeXt',
        depth=101,
        groups=32,
        base_width=4,
        mask_groups=2,
        base_stride=2,
        alpha=2,
        beta=1,
        # Detection inputs vary in size, so regions have a fixed size in
        # feature pixels per stage (the size the 14/7/2 grid gives at 224).
        patch_grid=None,
        patch_size=(4, 4, 7),
        target_rate=0.5,
        rate_loss_weight=0.5,
        rate_loss='batch',
        out_indices=(0, 1, 2, 3),
        # As mmdet's ResNeXt-101 baseline: stem and stage 1 frozen, BN frozen.
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/sar-resnext101-32x4d-g2s2a2b1_in1k_backbone.pth')))

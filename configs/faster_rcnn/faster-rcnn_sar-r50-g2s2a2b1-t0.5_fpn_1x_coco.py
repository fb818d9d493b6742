# Faster R-CNN + FPN, 1x (12 epochs) on COCO with an ImageNet-pretrained
# SAR-ResNet50 G2s2a2b1 (t=0.5) backbone: the paper's first detection setting
# (Han et al., TIP 2021, Sec. IV-E). Everything but the backbone is mmdet's
# faster-rcnn_r50_fpn_1x_coco.py (800x1333, SGD lr 0.02 for 16 images).
#
# Baseline: mmdet Faster R-CNN R50-FPN 1x, 37.4 box AP (mmdet 3.3.0 model zoo,
# configs/faster_rcnn/metafile.yml). Test/val logs
# `act_rate` and `effective_gflops` (backbone) next to coco/bbox_mAP.
#
# The backbone weights come from ImageNet pretraining, converted to a
# backbone-only checkpoint:
#   tools/dist_train.sh configs/sar_resnet/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py 8
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnet50-g2s2a2b1_in1k_backbone.pth \
#       --check-config configs/faster_rcnn/faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/sar_hooks.py']

model = dict(
    type='sar_backbones.SARFasterRCNN',
    backbone=dict(
        _delete_=True,
        type='sar_backbones.SARResNet',
        depth=50,
        mask_groups=2,
        base_stride=2,
        alpha=2,
        beta=1,
        # Detection inputs vary in size (800x1333 and everything in between),
        # so regions have a fixed size in feature pixels per stage (the size
        # the 14/7/2 grid gives at 224 input) instead of a fixed count.
        patch_grid=None,
        patch_size=(4, 4, 7),
        target_rate=0.5,
        # lambda as in ImageNet pretraining; the paper gives no separate value
        # for finetuning.
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

# DeepLabV3 on PASCAL VOC 2012 + SBD aug (10582 images), 512x512 crops, 20k
# iterations, with SAR-MobileNetV2 G2s2a2b1 (t=0.5) in OS8 mode.
#
# The dataset, schedule and heads are mmseg's deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py
# (the base below: mmseg 1.2.2 ships MobileNetV2 DeepLab configs for ADE20K and
# Cityscapes only); the backbone and head widths follow mmseg's
# mobilenet_v2/mobilenet-v2-d8_deeplabv3_4xb4-160k_ade20k-512x512.py: strides
# (1, 2, 2, 1, 1, 1, 1), dilations (1, 1, 1, 2, 2, 4, 4), outputs of layers
# 2/3/5/7; the decode head reads layer 7 (in_index=3, 320 channels), the
# auxiliary FCN layer 5 (in_index=2, 96 channels).
#
# Baselines (mmseg 1.2.2 model zoo): MobileNetV2-D8 DeepLabV3 ADE20K 160k,
# 34.08 mIoU (no VOC run in the zoo); DeepLabV3 R50-D8 VOC aug 20k, 76.17.
# Val/test log `act_rate` and `effective_gflops` (backbone) next to mIoU.
#
# ImageNet weights (same G/s/alpha/beta: the architecture record must match):
#   tools/dist_train.sh configs/sar_mobilenet_v2/sar-mobilenet-v2-g2s2a2b1-t0.5_8xb32_in1k.py 8
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-mobilenet-v2-g2s2a2b1-t0.5_8xb32_in1k/epoch_300.pth \
#       checkpoints/sar-mobilenet-v2-g2s2a2b1_in1k_backbone.pth
# (the classifier's last 1x1 conv, unused here, is skipped when loading).
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py',
          '../_base_/sar_hooks.py']

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='sar_backbones.SAREncoderDecoder',
    # The ImageNet weights come through the backbone's init_cfg.
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='sar_backbones.SARMobileNetV2',
        widen_factor=1.0,
        mask_groups=2,
        base_stride=2,
        alpha=2,
        beta=1,
        # Test images keep their aspect ratio (short side 512): regions of a
        # fixed size in feature pixels (the ImageNet model's 4/4/7/7) rather
        # than a fixed count.
        patch_grid=None,
        patch_size=(4, 4, 7, 7),
        target_rate=0.5,
        rate_loss_weight=0.5,
        rate_loss='batch',
        strides=(1, 2, 2, 1, 1, 1, 1),
        dilations=(1, 1, 1, 2, 2, 4, 4),
        out_indices=(1, 2, 4, 6),
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/sar-mobilenet-v2-g2s2a2b1_in1k_backbone.pth')),
    decode_head=dict(in_channels=320),
    auxiliary_head=dict(in_channels=96))

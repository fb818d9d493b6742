# DeepLabV3 on PASCAL VOC 2012 + SBD aug (10582 images), 512x512 crops,
# 20k iterations, with SAR-ResNet50 G2s4a1b1 (t=0.5) in OS8 mode: the paper's
# segmentation setting (Han et al., TIP 2021, Sec. IV-F: "SAR-ResNet50
# (G2s4a1, t = 0.5)"). Everything but the backbone is mmseg's
# deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py.
#
# Baseline: mmseg DeepLabV3 R50-D8 VOC aug 20k, 76.17 mIoU (mmseg 1.2.2 model
# zoo, configs/deeplabv3/metafile.yaml). Val/test logs
# `act_rate` and `effective_gflops` (backbone) next to mIoU.
#
# Like mmseg's ResNetV1c baseline the backbone has the deep stem and dilated
# stages 3-4 (output stride 8). Its ImageNet weights:
#   tools/dist_train.sh configs/sar_resnet/sar-resnetv1c50-g2s4a1b1-t0.5_8xb32_in1k.py 8
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnetv1c50-g2s4a1b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnetv1c50-g2s4a1b1_in1k_backbone.pth
#
# SyncBN as in mmseg's config (GPU training); a non-distributed run reverts it
# to BN automatically (mmengine Runner), and tools/train.py swaps it for BN in
# distributed CPU runs.
_base_ = [
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py', '../_base_/sar_hooks.py'
]

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='sar_backbones.SAREncoderDecoder',
    # The ImageNet weights come through the backbone's init_cfg.
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='sar_backbones.SARResNet',
        depth=50,
        mask_groups=2,
        base_stride=4,
        alpha=1,
        beta=1,
        # Test images keep their aspect ratio (short side 512), so regions
        # have a fixed size in feature pixels per stage rather than a fixed
        # count.
        patch_grid=None,
        patch_size=(4, 4, 7),
        target_rate=0.5,
        # lambda as in ImageNet pretraining.
        rate_loss_weight=0.5,
        rate_loss='batch',
        out_indices=(0, 1, 2, 3),
        # OS8 as mmseg's ResNetV1c-D8: the decode head reads stage 4
        # (in_index=3, 2048 channels), the auxiliary FCN stage 3 (1024).
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        contract_dilation=True,
        deep_stem=True,
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/sar-resnetv1c50-g2s4a1b1_in1k_backbone.pth')))

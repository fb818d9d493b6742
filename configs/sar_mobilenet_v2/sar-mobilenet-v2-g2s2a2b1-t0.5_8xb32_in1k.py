# SAR-MobileNetV2 (widen factor 1.0) G2s2a2b1, target rate t=0.5: ImageNet-1k
# pretraining (Han et al., TIP 2021, Table VII: "SAR can be incorporated with
# group (or depth-wise) convolutions"). mmpretrain's MobileNetV2 recipe
# (300 epochs, SGD lr 0.045 momentum 0.9 wd 4e-5, step decay 0.98 per epoch,
# batch 256) with SAR's additions: L = L_cls + 0.5 * L_refine (batch target,
# Eq. 10), Gumbel temperature 1.0 -> 0.01 and the target-rate steps 1 -> t at
# 30/110, 45/110 and 60/110 of training (configs/_base_/sar_hooks.py).
# Everything else is mmpretrain's mobilenet-v2_8xb32_in1k.py.
#
# Baseline: mmpretrain MobileNetV2 1.0x (configs/mobilenet_v2/mobilenet-v2_8xb32_in1k.py,
# mmpretrain 1.2.0 model zoo): 71.86 top-1 at 0.319 GFLOPs, 3.5 M parameters.
# This model (README, "SAR-MobileNetV2"): 3.54 M parameters,
# F(r) = 0.196 + 0.067 r GMACs with the classifier head (plain: 0.301).
#
# Train: tools/dist_train.sh configs/sar_mobilenet_v2/sar-mobilenet-v2-g2s2a2b1-t0.5_8xb32_in1k.py 8
# Convert for segmentation:
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-mobilenet-v2-g2s2a2b1-t0.5_8xb32_in1k/epoch_300.pth \
#       checkpoints/sar-mobilenet-v2-g2s2a2b1_in1k_backbone.pth
_base_ = ['mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py', '../_base_/sar_hooks.py']

model = dict(
    type='sar_backbones.SARImageClassifier',
    backbone=dict(
        _delete_=True,
        type='sar_backbones.SARMobileNetV2',
        widen_factor=1.0,
        # G: two mask groups in the refine branch of layers 2-5.
        mask_groups=2,
        base_stride=2,
        alpha=2,
        beta=1,
        # 14/7/2/2 regions per side at 224 input (4, 4, 7 and 7-pixel
        # patches), the authors' mask sizes.
        patch_grid=(14, 7, 2, 2),
        target_rate=0.5,
        rate_loss_weight=0.5,
        rate_loss='batch',
        temperature=1.0,
        # mmpretrain's output: the last 1x1 conv (1280 channels).
        out_indices=(7, )))

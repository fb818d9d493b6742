# SAR-ResNetV1c-50 G2s4a1b1, target rate t=0.5: ImageNet-1k pretraining of the
# backbone of the paper's segmentation setting (SAR-ResNet50 G2s4a1, t=0.5).
# Like mmseg's ResNetV1c baselines it uses the deep stem (three 3x3 convs), so
# its weights load into configs/deeplabv3/ and configs/pspnet/. Same recipe as
# sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py.
#
# Baseline: mmpretrain ResNetV1c-50 (configs/resnet/resnetv1c50_8xb32_in1k.py,
# mmpretrain 1.2.0 model zoo, configs/resnet/metafile.yml): 77.01 top-1 at
# 4.36 GFLOPs.
#
# Convert for segmentation:
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnetv1c50-g2s4a1b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnetv1c50-g2s4a1b1_in1k_backbone.pth
_base_ = './sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'

model = dict(backbone=dict(base_stride=4, alpha=1, deep_stem=True))

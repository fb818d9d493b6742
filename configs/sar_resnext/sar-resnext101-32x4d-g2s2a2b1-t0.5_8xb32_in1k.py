# SAR-ResNeXt-101 32x4d G2s2a2b1, target rate t=0.5: ImageNet-1k pretraining,
# the same recipe as the 50-layer model; the backbone of
# configs/faster_rcnn/faster-rcnn_sar-x101-32x4d-g2s2a2b1-t0.5_fpn_1x_coco.py.
#
# Baseline: mmpretrain ResNeXt-101 32x4d (configs/resnext/resnext101-32x4d_8xb32_in1k.py,
# mmpretrain 1.2.0 model zoo): 78.61 top-1 at 8.03 GFLOPs, 44.18 M parameters.
#
# Train: tools/dist_train.sh configs/sar_resnext/sar-resnext101-32x4d-g2s2a2b1-t0.5_8xb32_in1k.py 8
# Convert for detection:
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnext101-32x4d-g2s2a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnext101-32x4d-g2s2a2b1_in1k_backbone.pth
_base_ = ['./sar-resnext50-32x4d-g2s2a2b1-t0.5_8xb32_in1k.py']

model = dict(backbone=dict(depth=101))

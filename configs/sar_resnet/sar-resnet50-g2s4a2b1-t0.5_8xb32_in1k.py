# SAR-ResNet50 G2s4a2b1, target rate t=0.5: ImageNet-1k pretraining of the
# base-stride-4 backbone used by the paper's second detection setting
# (configs/faster_rcnn/faster-rcnn_sar-r50-g2s4a2b1-t0.5_fpn_1x_coco.py and the
# RetinaNet counterpart). Same recipe as
# sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py.
#
# Baseline: mmpretrain ResNet-50 (configs/resnet/resnet50_8xb32_in1k.py,
# mmpretrain 1.2.0 model zoo, configs/resnet/metafile.yml): 76.55 top-1 at 4.12
# GFLOPs.
#
# Convert for detection:
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnet50-g2s4a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnet50-g2s4a2b1_in1k_backbone.pth
_base_ = './sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'

model = dict(backbone=dict(base_stride=4))

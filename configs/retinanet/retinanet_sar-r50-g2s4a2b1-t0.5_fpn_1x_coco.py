# RetinaNet + FPN, 1x on COCO with SAR-ResNet50 G2s4a2b1 (t=0.5): the paper's
# second detection setting (base branch at 1/4 resolution).
#
# Baseline: mmdet RetinaNet R50-FPN 1x, 36.5 box AP (mmdet 3.3.0 model zoo,
# configs/retinanet/metafile.yml).
#
# Backbone weights: train configs/sar_resnet/sar-resnet50-g2s4a2b1-t0.5_8xb32_in1k.py,
# then
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnet50-g2s4a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnet50-g2s4a2b1_in1k_backbone.pth
_base_ = './retinanet_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        base_stride=4,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/sar-resnet50-g2s4a2b1_in1k_backbone.pth')))

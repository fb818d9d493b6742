# Faster R-CNN + FPN, 1x on COCO with SAR-ResNet50 G2s4a2b1 (t=0.5): the
# paper's second detection setting, base branch at 1/4 resolution (cheaper;
# the paper notes s=4 may hurt small objects while mAP_M/mAP_L improve).
#
# Baseline: mmdet Faster R-CNN R50-FPN 1x, 37.4 box AP (mmdet 3.3.0 model zoo,
# configs/faster_rcnn/metafile.yml).
#
# Backbone weights: train configs/sar_resnet/sar-resnet50-g2s4a2b1-t0.5_8xb32_in1k.py,
# then
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnet50-g2s4a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnet50-g2s4a2b1_in1k_backbone.pth
_base_ = './faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        base_stride=4,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/sar-resnet50-g2s4a2b1_in1k_backbone.pth')))

# SAR-ResNet34 G2s2a2b1, target rate t=0.5: ImageNet-1k pretraining, same
# recipe as sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py (BasicBlock stages).
#
# Baseline: mmpretrain ResNet-34 (configs/resnet/resnet34_8xb32_in1k.py,
# mmpretrain 1.2.0 model zoo, configs/resnet/metafile.yml): 73.62 top-1 at
# 3.68 GFLOPs.
_base_ = './sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'

model = dict(backbone=dict(depth=34), head=dict(in_channels=512))

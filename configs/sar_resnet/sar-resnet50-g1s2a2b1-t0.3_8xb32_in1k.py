# SAR-ResNet50 G1s2a2b1, target rate t=0.3: ImageNet-1k pretraining, same
# recipe as sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py. The paper reports this
# setting matches ResNet-50's accuracy while cutting FLOPs by 39.7% (README.md,
# "Complexity").
#
# Baseline: mmpretrain ResNet-50 (configs/resnet/resnet50_8xb32_in1k.py,
# mmpretrain 1.2.0 model zoo, configs/resnet/metafile.yml): 76.55 top-1 at 4.12
# GFLOPs.
_base_ = './sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'

model = dict(backbone=dict(mask_groups=1, target_rate=0.3))

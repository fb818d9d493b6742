# DeepLabV3 on PASCAL VOC 2012 + SBD aug with SAR-ResNet50 G2s4a1b1 (t=0.5), OS8:
# the 20k-iteration config trained for 40k iterations, as mmseg's
# deeplabv3_r50-d8_4xb4-40k_voc12aug-512x512.py (its schedule_40k below).
#
# Baseline: mmseg DeepLabV3 R50-D8 VOC aug 40k, 77.68 mIoU (mmseg 1.2.2 model
# zoo, configs/deeplabv3/metafile.yaml). The tau and target
# milestones are fractions of training, so they stretch with it.
_base_ = './deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py'

param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=40000,
         by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000))

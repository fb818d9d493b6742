# SAR-ResNet50 G2s2a2b1, target rate t=0.5: ImageNet-1k pretraining with the
# paper's recipe (Han et al., TIP 2021, appendix):
# 110 epochs, Nesterov SGD (momentum 0.9, wd 1e-4, lr 0.1 x batch/256),
# 5-epoch linear warmup then cosine decay, label smoothing 0.1,
# L = L_cls + 0.5 * L_refine (batch target, Eq. 10), Gumbel temperature
# 1.0 -> 0.01 exponentially per iteration, target rate 1 -> t in three steps
# at epochs 30/45/60.
#
# Baseline: mmpretrain ResNet-50 (configs/resnet/resnet50_8xb32_in1k.py,
# mmpretrain 1.2.0 model zoo, configs/resnet/metafile.yml): 76.55 top-1 at 4.12
# GFLOPs.
# This model: F(r) = 1.857 + 1.047 r GMACs with the classifier head (README.md,
# "Complexity"); eval logs `act_rate` and `effective_gflops` (backbone only).
#
# Train: tools/dist_train.sh configs/sar_resnet/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py 8
# Convert for detection:
#   python tools/model_converters/sar2backbone.py \
#       work_dirs/sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k/epoch_110.pth \
#       checkpoints/sar-resnet50-g2s2a2b1_in1k_backbone.pth
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py', '../_base_/sar_hooks.py']

model = dict(
    type='sar_backbones.SARImageClassifier',
    backbone=dict(
        _delete_=True,
        type='sar_backbones.SARResNet',
        depth=50,
        mask_groups=2,
        base_stride=2,
        alpha=2,
        beta=1,
        # 14/7/2 regions per side at 224 input: 4x4, 4x4 and 7x7-pixel
        # patches, the model behind the paper's headline numbers.
        patch_grid=(14, 7, 2),
        target_rate=0.5,
        # lambda = 0.5 for ImageNet (paper, appendix C).
        rate_loss_weight=0.5,
        rate_loss='batch',
        temperature=1.0,
        out_indices=(3, )),
    head=dict(
        loss=dict(
            _delete_=True,
            type='LabelSmoothLoss',
            label_smooth_val=0.1,
            loss_weight=1.0)))

# 8 GPUs x 32 images = 256 per iteration, so lr = 0.1 x 256 / 256.
optim_wrapper = dict(
    optimizer=dict(
        type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True))

max_epochs = 110
warmup_epochs = 5
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        begin=0,
        end=warmup_epochs,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=max_epochs - warmup_epochs,
        by_epoch=True,
        begin=warmup_epochs,
        end=max_epochs,
        convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)


# Use `--auto-scale-lr` style scaling for other total batch sizes.
auto_scale_lr = dict(base_batch_size=256)

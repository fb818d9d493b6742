# What every SAR-ResNet training config adds to its OpenMMLab base config.
custom_imports = dict(imports=['sar_backbones'], allow_failed_imports=False)

custom_hooks = [
    # Gumbel-softmax temperature tau: exponential decay 1.0 -> 0.01 over
    # training, per iteration (paper Appendix C).
    dict(type='sar_backbones.SARTemperatureHook', mode='exp', start=1.0,
         end=0.01),
    # Target rate: 1 first, then t + 2(1-t)/3, t + (1-t)/3 and t, reaching t
    # mid-training (ImageNet: epochs 30, 45 and 60 of 110); t is the
    # backbone's target_rate. mode='constant' keeps either value fixed.
    dict(
        type='sar_backbones.SARTargetRateHook',
        mode='step',
        milestones=(30 / 110, 45 / 110, 60 / 110)),
    # Not in the paper (issue 16), for short schedules whose inference rates
    # miss t (see configs/demo/ and docs/demo_results.md): add
    # dict(type='sar_backbones.SARGumbelNoiseHook', begin=0.6) and
    # dict(type='sar_backbones.SARRateCalibrationHook', pipeline=test_pipeline),
    # and the backbone option deterministic_rate_weight.
    # Inference activation rates (mean, per stage, per block), the training
    # rates since the last validation, and effective GFLOPs next to the
    # val/test metrics.
    dict(type='sar_backbones.SARRateLoggerHook'),
    # Logged training rates averaged over all ranks, not rank 0's alone.
    dict(type='sar_backbones.SARRateSyncHook'),
    # Gumbel noise and main-process data loading seeded from (seed, rank,
    # iteration): ranks draw different masks, a resumed run the same ones.
    dict(type='sar_backbones.SARNoiseSeedHook'),
]

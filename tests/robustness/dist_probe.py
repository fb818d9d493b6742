"""A hook that records, on every rank of a distributed run, what the test checks.

Imported by the training processes through the config's ``custom_imports``
(``tests.robustness.dist_probe``; ``tools/dist_train.sh`` puts the repository
root on ``PYTHONPATH``). Not a test module itself.

Per rank it writes ``<out_dir>/rank<r>.json`` after training with:

* per iteration: the local batch size, the activation rate of the local batch
  (recomputed from the backbone's masks), the logged outputs (after
  ``SARRateSyncHook``), the message hub's ``train/act_rate``, and the rate
  loss recomputed from the local masks with Eq. 10;
* per iteration: the seed of PyTorch's generator when the iteration starts
  (``torch.initial_seed()``, set by ``SARNoiseSeedHook`` for the Gumbel
  noise) and ``runner.seed``;
* the SHA-256 of every parameter and of all parameters together.
"""
import hashlib
import json
import math
import os.path as osp

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from sar_backbones.engine import get_sar_backbone


def parameter_hashes(named_tensors):
    """``({name: sha256}, overall sha256)`` of float32 CPU copies, in name order."""
    per_name, overall = {}, hashlib.sha256()
    for name, tensor in sorted(named_tensors):
        data = tensor.detach().to('cpu', torch.float32).contiguous().numpy().tobytes()
        per_name[name] = hashlib.sha256(data).hexdigest()
        overall.update(name.encode() + data)
    return per_name, overall.hexdigest()


@HOOKS.register_module(name='SARRobustnessDistProbe')
class DistProbeHook(Hook):
    """See the module docstring.

    Args:
        out_dir (str): Where to write ``rank<r>.json``.
        perturb_selectors (bool): Before training, give every region selector
            the same (seeded) feature-driven logits on every rank, so that the
            masks are partial and depend on each rank's images.
    """

    priority = 'LOWEST'

    def __init__(self, out_dir, perturb_selectors=True):
        self.out_dir = out_dir
        self.perturb_selectors = perturb_selectors
        self.records = []
        self.noise_seeds = []

    def before_train(self, runner):
        if not self.perturb_selectors:
            return
        backbone = get_sar_backbone(runner.model)
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for stage in backbone.sar_stages:
                for selector in stage.selectors:
                    weight = torch.randn(selector.fc.weight.shape, generator=generator) * 2.0
                    selector.fc.weight.copy_(weight)
                    selector.fc.bias.zero_()

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        # LOWEST priority: after SARNoiseSeedHook (HIGHEST) seeded the noise.
        self.noise_seeds.append(dict(iter=runner.iter, seed=int(torch.initial_seed()),
                                     runner_seed=int(runner.seed)))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        backbone = get_sar_backbone(runner.model)
        rates = backbone.get_activation_rates().detach().float()
        eq10 = backbone.rate_loss_weight * (rates.mean(0) - backbone.target_rate).pow(2).mean()
        logged = {key: float(value) for key, value in (outputs or {}).items()}
        self.records.append(dict(
            iter=runner.iter,
            batch=int(rates.shape[0]),
            local_act_rate=float(rates.mean()),
            local_eq10=float(eq10),
            outputs=logged,
            hub_act_rate=float(runner.message_hub.get_scalar('train/act_rate').current()),
            all_finite=all(math.isfinite(v) for v in logged.values())))

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        per_name, overall = parameter_hashes(model.named_parameters())
        result = dict(rank=get_rank(), world_size=get_world_size(), records=self.records,
                      noise_seeds=self.noise_seeds,
                      param_hashes=per_name, params_sha256=overall,
                      wrapper=type(runner.model).__name__)
        with open(osp.join(self.out_dir, f'rank{get_rank()}.json'), 'w') as file:
            json.dump(result, file, indent=1)

"""A deployed SAR-ResNet compiles: no graph break inside a stage, no recompilation on new masks,
and the compiled output is the dense masked function."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from tests.inference.helpers import (NARROW_50, OS8, assert_close, deployed_copy, eval_model,
                                     force_selection, forward)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _stage_runner(stage):
    def run(x):
        return stage(x, 1.0, sparse=True)
    return run


@pytest.mark.parametrize('kwargs', [dict(), dict(NARROW_50, patch_size=(4, 4, 7)), dict(OS8)])
def test_every_deployed_stage_is_one_graph_and_masks_do_not_recompile(kwargs):
    """fullgraph=True fails on any graph break; new images (new masks) reuse the graph."""
    model = deployed_copy(eval_model(seed=20, **kwargs))
    images = [torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(s))
              for s in range(3)]
    with torch.no_grad():
        inputs = [model._stem_forward(x) for x in images]
        masks_changed = False
        for stage in model.sar_stages:
            counter = CompileCounter()
            compiled = torch.compile(_stage_runner(stage), backend=counter, fullgraph=True)
            outs = []
            for x in inputs:
                out, masks = compiled(x)
                expected, expected_masks = stage(x, 1.0, sparse=False)
                assert_close([out], [expected])
                assert all(torch.equal(a, b) for a, b in zip(masks, expected_masks))
                outs.append((out, masks))
            assert counter.frame_count == 1  # compiled once, no recompilation
            masks_changed |= not all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
            inputs = [out for out, _ in outs]
    assert masks_changed  # the images did select different patches


@pytest.mark.parametrize('kwargs,size,select', [
    (dict(), (1, 3, 67, 93), None),                       # odd size, learned partial masks
    (dict(NARROW_50), (1, 3, 64, 64), True),              # all selected
    (dict(NARROW_50), (1, 3, 64, 64), False),             # nothing selected
    (dict(OS8), (1, 3, 72, 64), None),                    # output stride 8
])
def test_compiled_backbone_equals_eager_dense(kwargs, size, select):
    model = eval_model(seed=21, **kwargs)
    if select is not None:
        force_selection(model, select)
    deployed = deployed_copy(model)
    counter = CompileCounter()
    compiled = torch.compile(deployed, backend=counter)
    for seed in range(2):
        x = torch.randn(*size, generator=torch.Generator().manual_seed(seed))
        expected, masks = forward(model, x, 'dense')
        outs, compiled_masks = forward(compiled, x)
        assert_close(outs, expected)
        assert all(torch.equal(a, b) for a, b in zip(compiled_masks, masks))
    assert counter.frame_count == 1  # one graph, no recompilation for the second image


def test_random_mask_override_compiles_without_recompiling():
    model = deployed_copy(eval_model(seed=22, **NARROW_50))
    reference = eval_model(seed=22, **NARROW_50)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(1, 3, 64, 64)
    for rate, seed in ((0.5, 0), (0.5, 1), (0.25, 2)):
        model.set_mask_override(rate, seed=seed)
        reference.set_mask_override(rate, seed=seed)
        expected, masks = forward(reference, x, 'dense')
        outs, compiled_masks = forward(compiled, x)
        assert_close(outs, expected)
        assert all(torch.equal(a, b) for a, b in zip(compiled_masks, masks))
    frames = counter.frame_count
    for seed in range(2):  # other images under the same override: no recompilation
        forward(compiled, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
    assert counter.frame_count == frames


def test_inductor_with_freezing():
    """The real compiler (default inductor, frozen and prepacked weights) calls the sparse op
    correctly. Without freezing it passes as well, but a second inductor compile doubles the
    test's ~70 s on two cores; the aot_eager tests above cover the graph itself."""
    import torch._inductor.config as inductor_config
    model = eval_model(seed=23)
    deployed = deployed_copy(model)
    x = torch.randn(1, 3, 64, 64)
    expected, _ = forward(model, x, 'dense')
    with inductor_config.patch(freezing=True):
        compiled = torch.compile(deployed)
        outs, _ = forward(compiled, x)
    assert_close(outs, expected)

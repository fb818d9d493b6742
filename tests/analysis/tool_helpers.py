"""Helpers of the analysis-tool tests: paths and the tools imported as modules."""
from ..script_loading import REPO, load_script

CLASSIFIER = REPO / 'configs' / 'sar_resnet' / 'sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'
DEEPLABV3 = (REPO / 'configs' / 'deeplabv3' /
             'deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py')
FASTER_RCNN = REPO / 'configs' / 'faster_rcnn' / 'faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'


def load_tool(name: str):
    """``tools/analysis/<name>.py`` loaded as it runs from the command line."""
    return load_script(f'tools/analysis/{name}.py')

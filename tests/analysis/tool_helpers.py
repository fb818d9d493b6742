"""Helpers of the analysis-tool tests: paths and the tools imported as modules."""
from pathlib import Path

from ..script_loading import load_script

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / 'tools' / 'analysis'
CLASSIFIER = REPO / 'configs' / 'sar_resnet' / 'sar-resnet50-g2s2a2b1-t0.5_8xb32_in1k.py'
DEEPLABV3 = (REPO / 'configs' / 'deeplabv3' /
             'deeplabv3_sar-r50-g2s4a1b1-t0.5-d8_4xb4-20k_voc12aug-512x512.py')
FASTER_RCNN = REPO / 'configs' / 'faster_rcnn' / 'faster-rcnn_sar-r50-g2s2a2b1-t0.5_fpn_1x_coco.py'


def load_tool(name: str):
    """Import ``tools/analysis/<name>.py`` as a module (the tools are scripts, not a package)."""
    return load_script(f'tools/analysis/{name}.py')

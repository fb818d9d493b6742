"""The shape data set generator (``tools/datasets/generate_shape_datasets.py``) and real loaders."""
from __future__ import annotations
import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from PIL import Image

import tools.datasets.generate_shape_datasets as gen
from ..script_loading import REPO

# Tiny but covering: several images per split and class, both splits.
SMALL = dict(num_train=6, num_val=4, image_size=(64, 96), cls_num_train=3, cls_num_val=2,
             cls_image_size=48)
VOC_ROOT = 'VOCdevkit/VOC2012'


def _generate(out: Path, seed: int = 0, **overrides) -> Path:
    gen.generate_all(out, seed=seed, **{**SMALL, **overrides})
    return out


def _tree_bytes(root: Path) -> Dict[str, bytes]:
    files = sorted(p for p in root.rglob('*') if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _decode(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert('RGB'), dtype=np.int16)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def coco_train(data_root: Path):
    from pycocotools.coco import COCO
    return COCO(str(data_root / 'coco/annotations/instances_train2017.json'))


# ---------------------------------------------------------------- determinism
def test_same_seed_gives_identical_bytes(data_root: Path, tmp_path: Path) -> None:
    again = _tree_bytes(_generate(tmp_path / 'again'))
    assert again == _tree_bytes(data_root)
    assert len(again) > 50


def test_other_seed_gives_other_data(data_root: Path, tmp_path: Path) -> None:
    other = _generate(tmp_path / 'other', seed=1)
    first = _tree_bytes(data_root)
    second = _tree_bytes(other)
    # Same layout and counts, different content.
    assert sorted(first) == sorted(second)
    images = [name for name in first if name.lower().endswith(('.jpg', '.jpeg', '.png'))]
    assert all(first[name] != second[name] for name in images)
    for split in ('train', 'val'):
        name = f'coco/annotations/instances_{split}2017.json'
        assert json.loads(first[name])['annotations'] != json.loads(second[name])['annotations']


def test_images_do_not_depend_on_counts(tmp_path: Path) -> None:
    small = gen.generate_coco(tmp_path / 'a', num_train=2, num_val=1, image_size=(64, 96))
    large = gen.generate_coco(tmp_path / 'b', num_train=3, num_val=2, image_size=(64, 96))
    assert small['splits']['train']['images'] == 2 and large['splits']['train']['images'] == 3
    for split, count in (('train', 2), ('val', 1)):
        folder = f'coco/{split}2017'
        for path in sorted((tmp_path / 'a' / folder).glob('*.jpg'))[:count]:
            assert path.read_bytes() == (tmp_path / 'b' / folder / path.name).read_bytes()


# ---------------------------------------------------------------- masks
def test_rle_masks_decode_to_the_mask() -> None:
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    masks = [rng.random(tuple(rng.integers(4, 30, size=2))) < 0.5 for _ in range(50)]
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    ring[5:7, 5:7] = True  # island inside the hole
    pinch = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], bool)  # only diagonal contacts
    for mask in masks + [ring, pinch, np.ones((5, 7), bool)]:
        rle = gen.mask_to_rle(mask)
        assert rle['size'] == list(mask.shape) and isinstance(rle['counts'], str)
        # Plain JSON survives a round trip, and pycocotools decodes it exactly.
        again = json.loads(json.dumps(rle))
        np.testing.assert_array_equal(mask_utils.decode(again).astype(bool), mask)
        assert mask_utils.area(again) == mask.sum()


def test_tight_bbox_uses_pixel_corners() -> None:
    mask = np.zeros((10, 12), bool)
    mask[3:6, 2:9] = True
    assert gen.tight_bbox(mask) == [2.0, 3.0, 7.0, 3.0]


# ---------------------------------------------------------------- annotation consistency
def test_coco_annotations_match_rendered_objects(data_root: Path, coco_train) -> None:
    info = json.loads((data_root / gen.INFO_FILE).read_text())['tasks']['coco']
    image_ids = sorted(coco_train.getImgIds())
    assert len(image_ids) == SMALL['num_train'] == info['splits']['train']['images']
    for index, image_id in enumerate(image_ids):
        scene = gen.detection_scene(0, 'train', index, SMALL['image_size'])
        meta = coco_train.loadImgs(image_id)[0]
        path = data_root / 'coco/train2017' / meta['file_name']
        assert path.read_bytes() == gen._encode_jpeg(scene.image)
        pixels = _decode(path)
        assert pixels.shape[:2] == (meta['height'], meta['width']) == scene.instance_map.shape
        anns = coco_train.loadAnns(coco_train.getAnnIds(imgIds=image_id))
        assert [a['category_id'] - 1 for a in anns] == scene.labels
        for object_index, ann in enumerate(anns):
            mask = coco_train.annToMask(ann).astype(bool)
            np.testing.assert_array_equal(mask, scene.object_mask(object_index))
            rows, cols = np.nonzero(mask)
            x, y, w, h = ann['bbox']
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert ann['area'] == mask.sum() >= 30 and ann['iscrowd'] == 0
            # The annotated pixels of the written image carry the object's colour.
            written, drawn = pixels[mask].mean(0), scene.image[mask].mean(0)
            assert np.abs(written - drawn).max() < 3


def test_coco_ids_and_categories(data_root: Path) -> None:
    train = json.loads((data_root / 'coco/annotations/instances_train2017.json').read_text())
    val = json.loads((data_root / 'coco/annotations/instances_val2017.json').read_text())
    assert [c['name'] for c in train['categories']] == list(gen.CLASSES)
    assert [c['id'] for c in train['categories']] == list(range(1, len(gen.CLASSES) + 1))
    train_ids = {i['id'] for i in train['images']}
    val_ids = {i['id'] for i in val['images']}
    assert not train_ids & val_ids
    for content in (train, val):
        ann_ids = [a['id'] for a in content['annotations']]
        assert len(set(ann_ids)) == len(ann_ids)
        annotated = {a['image_id'] for a in content['annotations']}
        assert annotated == {i['id'] for i in content['images']}
    sizes = {(i['height'], i['width']) for i in train['images'] + val['images']}
    assert all(64 <= h <= 96 and 64 <= w <= 96 for h, w in sizes)


def test_voc_masks_match_scene_classes(data_root: Path, coco_train) -> None:
    voc = data_root / VOC_ROOT
    names = (voc / 'ImageSets/Segmentation/train.txt').read_text().split()
    assert len(names) == SMALL['num_train']
    for index, name in enumerate(names):
        scene = gen.detection_scene(0, 'train', index, SMALL['image_size'])
        label_png = Image.open(voc / 'SegmentationClass' / f'{name}.png')
        assert label_png.mode == 'P' and label_png.getpalette()[:768] == gen.VOC_PALETTE
        label = np.asarray(label_png)
        assert set(np.unique(label)) - {0, 255} == {c + 1 for c in scene.labels}
        exact = scene.semantic_map(ignore_radius=0)
        ignored = label == 255
        np.testing.assert_array_equal(label[~ignored], exact[~ignored])
        # The ignore band is thin and lies on boundaries: every ignored pixel
        # touches another class, and most pixels keep their label.
        low, high = gen._window_min_max(exact, 1)
        assert (low != high)[ignored].all() and ignored.mean() < 0.25
        # Same scene as COCO: each class is the union of its instance masks.
        anns = coco_train.loadAnns(coco_train.getAnnIds(imgIds=gen._ID_OFFSETS['train'] + index))
        for class_index in range(len(gen.CLASSES)):
            union = np.zeros(label.shape, bool)
            for ann in anns:
                if ann['category_id'] == class_index + 1:
                    union |= coco_train.annToMask(ann).astype(bool)
            np.testing.assert_array_equal(union[~ignored], (label == class_index + 1)[~ignored])
        assert (voc / 'JPEGImages' / f'{name}.jpg').read_bytes() == gen._encode_jpeg(scene.image)


def test_semantic_map_ignore_band() -> None:
    instance_map = np.full((8, 8), -1, np.int16)
    instance_map[2:6, 2:6] = 0
    scene = gen.Scene(np.zeros((8, 8, 3), np.uint8), instance_map, [3])
    band = scene.semantic_map(1)
    assert band[0, 0] == 0 and band[3, 3] == 4 and band[2, 2] == band[1, 1] == 255
    # The object's outer ring (16 - 4) plus the background ring around it (36 - 16).
    assert (band == 255).sum() == 12 + 20
    np.testing.assert_array_equal(scene.semantic_map(0) == 4, instance_map == 0)


def test_imagenet_layout_and_labels(data_root: Path) -> None:
    root = data_root / 'imagenet'
    assert (root / 'classes.txt').read_text().split() == list(gen.CLASSES)
    for split, per_class in (('train', SMALL['cls_num_train']), ('val', SMALL['cls_num_val'])):
        assert sorted(p.name for p in (root / split).iterdir()) == list(gen.CLASSES)
        lines = (root / 'meta' / f'{split}.txt').read_text().splitlines()
        assert len(lines) == per_class * len(gen.CLASSES)
        for line in lines:
            relative, label = line.split()
            folder, file_name = relative.split('/')
            assert gen.CLASSES.index(folder) == int(label)
            index = int(file_name.split('_')[-1].split('.')[0])
            scene = gen.classification_scene(0, split, int(label), index, SMALL['cls_image_size'])
            assert (root / split / relative).read_bytes() == gen._encode_jpeg(scene.image)
            assert scene.image.shape == (48, 48, 3)
            # The folder's class is the image's dominant object.
            areas = [scene.object_mask(i).sum() for i in range(len(scene.labels))]
            assert scene.labels[scene.primary] == int(label)
            assert int(np.argmax(areas)) == scene.primary


def test_voc_palette_is_the_standard_one() -> None:
    palette = gen.VOC_PALETTE
    assert len(palette) == 768
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert palette[3 * 15:3 * 16] == [192, 128, 128]  # person
    assert palette[3 * 255:] == [224, 224, 192]  # the ignore colour
    assert gen.SEG_PALETTE[0] == [0, 0, 0]
    assert gen.SEG_PALETTE[1:] == gen.PALETTE


# ---------------------------------------------------------------- real loaders
def test_pycocotools_loads(coco_train) -> None:
    assert len(coco_train.getImgIds()) == SMALL['num_train']
    assert coco_train.getCatIds(catNms=list(gen.CLASSES)) == [1, 2, 3, 4, 5]
    assert len(coco_train.getAnnIds()) >= SMALL['num_train']


def test_mmdet_coco_dataset_loads(data_root: Path, coco_train) -> None:
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules()
    dataset = CocoDataset(
        data_root=str(data_root / 'coco'), ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'), metainfo=dict(classes=gen.CLASSES),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='mmdet.LoadAnnotations', with_bbox=True, with_mask=True)])
    assert len(dataset) == SMALL['num_train']
    assert dataset.metainfo['classes'] == gen.CLASSES
    sample = dataset[0]
    image_id = sample['img_id']
    anns = coco_train.loadAnns(coco_train.getAnnIds(imgIds=image_id))
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)])
    np.testing.assert_allclose(sample['gt_bboxes'].tensor.numpy(), boxes)
    np.testing.assert_array_equal(sample['gt_bboxes_labels'], [a['category_id'] - 1 for a in anns])
    assert not sample['gt_ignore_flags'].any()
    masks = sample['gt_masks'].to_ndarray().astype(bool)
    scene = gen.detection_scene(0, 'train', image_id - gen._ID_OFFSETS['train'],
                                SMALL['image_size'])
    assert len(masks) == len(scene.labels)
    for index, (mask, ann) in enumerate(zip(masks, anns)):
        np.testing.assert_array_equal(mask, coco_train.annToMask(ann).astype(bool))
        np.testing.assert_array_equal(mask, scene.object_mask(index))
    assert sample['img'].shape[:2] == masks.shape[1:]
    # Boxes only (the demo detector's pipeline): the RLE masks are not needed.
    boxes_only = CocoDataset(
        data_root=str(data_root / 'coco'), ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'), metainfo=dict(classes=gen.CLASSES),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='mmdet.LoadAnnotations', with_bbox=True, with_mask=False)])
    plain = boxes_only[0]
    assert plain['img_id'] == image_id and 'gt_masks' not in plain
    np.testing.assert_allclose(plain['gt_bboxes'].tensor.numpy(), boxes)
    assert not plain['gt_ignore_flags'].any()


def _seg_pipeline() -> list:
    return [dict(type='mmseg.LoadImageFromFile'), dict(type='mmseg.LoadAnnotations')]


def test_mmseg_voc_loaders(data_root: Path) -> None:
    from mmseg.datasets import BaseSegDataset, PascalVOCDataset
    voc = data_root / VOC_ROOT
    common = dict(data_root=str(voc), ann_file='ImageSets/Segmentation/val.txt',
                  data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
                  pipeline=_seg_pipeline())
    first = (voc / 'ImageSets/Segmentation/val.txt').read_text().split()[0]
    expected = np.asarray(Image.open(voc / 'SegmentationClass' / f'{first}.png'))
    # PascalVOCDataset itself reads the layout and the palette indices...
    voc_dataset = PascalVOCDataset(**common)
    # ...but mmseg 1.2.2 only accepts subsets of the VOC class names, so our
    # classes go through BaseSegDataset, which reads the same layout.
    ours = BaseSegDataset(img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=False,
                          metainfo=dict(classes=gen.SEG_CLASSES, palette=gen.SEG_PALETTE),
                          **common)
    assert ours.metainfo['classes'] == gen.SEG_CLASSES and ours.label_map is None
    for dataset in (voc_dataset, ours):
        assert len(dataset) == SMALL['num_val']
        sample = dataset[0]
        assert Path(sample['img_path']).stem == first
        np.testing.assert_array_equal(sample['gt_seg_map'], expected)
        assert sample['img'].shape[:2] == expected.shape


def test_mmpretrain_loaders(data_root: Path) -> None:
    from mmpretrain.datasets import CustomDataset, ImageNet
    root = str(data_root / 'imagenet')
    pipeline = [dict(type='mmpretrain.LoadImageFromFile')]
    for split, per_class in (('train', SMALL['cls_num_train']), ('val', SMALL['cls_num_val'])):
        by_file = ImageNet(data_root=root, split=split, metainfo=dict(classes=gen.CLASSES),
                           pipeline=pipeline)
        by_folder = CustomDataset(data_root=root, data_prefix=split,
                                  metainfo=dict(classes=str(data_root / 'imagenet/classes.txt')),
                                  pipeline=pipeline)
        assert by_file.ann_file.endswith(f'meta/{split}.txt') and not by_folder.ann_file
        for dataset in (by_file, by_folder):
            assert len(dataset) == per_class * len(gen.CLASSES)
            assert tuple(dataset.metainfo['classes']) == gen.CLASSES
            # Both layouts agree on every label, and labels match the folders.
            for index in range(len(dataset)):
                info = dataset.get_data_info(index)
                assert gen.CLASSES[info['gt_label']] == Path(info['img_path']).parent.name
        sample = by_file[len(by_file) - 1]
        assert sample['img'].shape == (48, 48, 3) and sample['gt_label'] == len(gen.CLASSES) - 1


# ---------------------------------------------------------------- CLI and safety
def test_cli_writes_requested_tasks_and_info(tmp_path: Path, capsys) -> None:
    out = tmp_path / 'cli'
    argv = ['--out', str(out), '--task', 'coco', 'voc', '--num-train', '2', '--num-val', '1',
            '--image-size', '64', '--seed', '3']
    assert gen.main(argv) == 0
    printed = capsys.readouterr().out
    assert 'coco' in printed and 'train 2 images' in printed
    assert not (out / 'imagenet').exists()
    info = json.loads((out / gen.INFO_FILE).read_text())
    assert info['classes'] == list(gen.CLASSES) and set(info['tasks']) == {'coco', 'voc'}
    assert info['tasks']['voc']['splits']['val']['images'] == 1
    assert info['tasks']['coco']['image_size_range'] == [64, 64]
    assert info['tasks']['coco']['seed'] == 3
    assert all(Image.open(p).size == (64, 64) for p in (out / 'coco/train2017').glob('*.jpg'))
    # A later run of another task keeps the earlier entries.
    assert gen.main(['--out', str(out), '--task', 'imagenet', '--cls-num-train', '1',
                     '--cls-num-val', '1', '--cls-image-size', '32']) == 0
    tasks = json.loads((out / gen.INFO_FILE).read_text())['tasks']
    assert set(tasks) == {'coco', 'voc', 'imagenet'}


def test_rerun_replaces_own_output_but_never_foreign_data(tmp_path: Path) -> None:
    gen.generate_imagenet(tmp_path, num_train_per_class=3, num_val_per_class=1, image_size=32)
    gen.generate_imagenet(tmp_path, num_train_per_class=1, num_val_per_class=1, image_size=32)
    # No stale files survive, or the folder layout would list them.
    assert len(list((tmp_path / 'imagenet/train').rglob('*.JPEG'))) == len(gen.CLASSES)
    foreign = tmp_path / 'real'
    (foreign / 'coco').mkdir(parents=True)
    (foreign / 'coco' / 'keep.txt').write_text('real data')
    with pytest.raises(FileExistsError, match='keep|coco'):
        gen.generate_coco(foreign, num_train=1, num_val=1, image_size=(64, 64))
    assert (foreign / 'coco' / 'keep.txt').read_text() == 'real data'
    assert _tree_bytes(foreign) == {'coco/keep.txt': b'real data'}
    assert gen.main(['--out', str(foreign), '--task', 'coco', '--num-train', '1']) == 2


TINY_CLS = dict(tasks=['imagenet'], cls_num_train=2, cls_num_val=1, cls_image_size=32)


def test_manifest_lists_exactly_the_written_files(tmp_path: Path) -> None:
    import hashlib
    info = json.loads((_generate(tmp_path) / gen.INFO_FILE).read_text())
    written = set(_tree_bytes(tmp_path)) - {gen.INFO_FILE}
    listed = {path for files in info['files'].values() for path in files}
    assert listed == written
    for files in info['files'].values():
        for path, digest in files.items():
            assert hashlib.sha256((tmp_path / path).read_bytes()).hexdigest()[:16] == digest


def test_user_file_in_a_generated_folder_survives_regeneration(tmp_path: Path) -> None:
    gen.generate_all(tmp_path, **TINY_CLS)
    gen.generate_coco(tmp_path, num_train=3, num_val=1, image_size=(64, 64))
    notes = {'imagenet/train/circle/notes.txt': b'mine', 'imagenet/my_split.txt': b'x 1\n',
             'coco/train2017/README': b'keep', 'coco/annotations/extra.json': b'{}',
             'imagenet/mine/deep/file.bin': b'\x00'}
    for relative, data in notes.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)
    # Fewer images: stale generated files go, the user's stay.
    gen.generate_all(tmp_path, **{**TINY_CLS, 'cls_num_train': 1})
    gen.generate_coco(tmp_path, num_train=1, num_val=1, image_size=(64, 64))
    tree = _tree_bytes(tmp_path)
    for relative, data in notes.items():
        assert tree[relative] == data
    assert len(list((tmp_path / 'coco/train2017').glob('*.jpg'))) == 1
    assert len(list((tmp_path / 'imagenet/train').rglob('*.JPEG'))) == len(gen.CLASSES)
    # The same content as a fresh run, plus the user's files.
    fresh = tmp_path / 'fresh'
    gen.generate_all(fresh, **{**TINY_CLS, 'cls_num_train': 1})
    gen.generate_coco(fresh, num_train=1, num_val=1, image_size=(64, 64))
    expected = _tree_bytes(fresh)
    mine = {k: v for k, v in tree.items() if k not in notes and not k.startswith('fresh/')}
    assert mine == expected


def test_foreign_dataset_info_is_refused_and_untouched(tmp_path: Path) -> None:
    for content in ('{"generator": "someone else", "tasks": {}}', 'not json', '[1, 2]'):
        (tmp_path / gen.INFO_FILE).write_text(content)
        with pytest.raises(FileExistsError, match=gen.INFO_FILE):
            gen.generate_all(tmp_path, **TINY_CLS)
        assert _tree_bytes(tmp_path) == {gen.INFO_FILE: content.encode()}


@pytest.mark.parametrize('relative', ['imagenet/train/circle/circle_00000.JPEG',
                                      'imagenet/classes.txt', 'imagenet/meta/val.txt'])
def test_modified_generated_file_is_never_replaced(tmp_path: Path, relative: str) -> None:
    gen.generate_all(tmp_path, **TINY_CLS)
    (tmp_path / relative).write_bytes(b'edited by the user')
    before = _tree_bytes(tmp_path)
    with pytest.raises(FileExistsError, match='modified'):
        gen.generate_all(tmp_path, **TINY_CLS)
    assert _tree_bytes(tmp_path) == before


def test_file_in_the_way_is_refused_before_writing(tmp_path: Path) -> None:
    gen.generate_all(tmp_path, **TINY_CLS)
    # More images would write circle_00002.JPEG, which the user put there.
    (tmp_path / 'imagenet/train/circle/circle_00002.JPEG').write_bytes(b'user image')
    # A file where the generator needs a folder.
    before = _tree_bytes(tmp_path)
    with pytest.raises(FileExistsError, match='circle_00002'):
        gen.generate_all(tmp_path, **{**TINY_CLS, 'cls_num_train': 3})
    assert _tree_bytes(tmp_path) == before
    (tmp_path / 'coco').write_text('a file, not a folder')
    with pytest.raises(FileExistsError, match='coco'):
        gen.generate_coco(tmp_path, num_train=1, num_val=1, image_size=(64, 64))
    assert (tmp_path / 'coco').read_text() == 'a file, not a folder'


def test_output_path_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    target = tmp_path / 'file'
    target.write_text('x')
    with pytest.raises(FileExistsError):
        gen.generate_all(target, **TINY_CLS)
    with pytest.raises(FileExistsError):
        gen.generate_all(target / 'below', **TINY_CLS)
    with pytest.raises(SystemExit) as exit_info:
        gen.main(['--out', str(target), '--task', 'imagenet'])
    assert exit_info.value.code == 2
    assert '--out' in capsys.readouterr().err
    assert gen.main(['--out', str(target / 'below'), '--task', 'imagenet']) == 2
    assert 'is a file' in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ['file'] and target.read_text() == 'x'


BAD_API_ARGUMENTS = [
    dict(num_train=0), dict(num_val=-1), dict(num_train=2.0), dict(num_train=True),
    dict(num_train=gen.MAX_SCENES + 1), dict(image_size=(100, 50)), dict(image_size=(16, 64)),
    dict(image_size=(64, 80, 96)), dict(image_size=()), dict(image_size=64),
    dict(image_size=(64.0, 96)), dict(image_size=(64, 100000)), dict(max_objects=0),
    dict(max_objects=float('nan')), dict(ignore_radius=3), dict(ignore_radius=-1),
    dict(seed=-1), dict(seed=1.5), dict(cls_num_train=0), dict(cls_num_val=-3),
    dict(cls_image_size=31), dict(cls_image_size=float('inf')), dict(tasks=['cityscapes']),
    dict(tasks=[]),
]


@pytest.mark.parametrize('bad', BAD_API_ARGUMENTS, ids=lambda bad: repr(bad))
def test_invalid_arguments_are_rejected_before_writing(tmp_path: Path, bad: dict) -> None:
    gen.generate_all(tmp_path, **TINY_CLS)
    before = _tree_bytes(tmp_path)
    arguments = dict(tasks=['imagenet', 'coco', 'voc'], num_train=1, num_val=1,
                     image_size=(64, 64), cls_num_train=1, cls_num_val=1, cls_image_size=32)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name if name != 'tasks' else 'tasks'):
        gen.generate_all(tmp_path, **{**arguments, **bad})
    assert _tree_bytes(tmp_path) == before


BAD_CLI_ARGUMENTS = [
    (['--num-train', '0'], '--num-train'), (['--num-train', '-1'], '--num-train'),
    (['--num-val', '2.5'], '--num-val'), (['--num-val', 'nan'], '--num-val'),
    (['--image-size', '64', '96', '128'], '--image-size'),
    (['--image-size', '96', '64'], '--image-size'), (['--image-size', '-64'], '--image-size'),
    (['--image-size', '16'], '--image-size'), (['--cls-num-train', '0'], '--cls-num-train'),
    (['--cls-num-val', '1e3'], '--cls-num-val'), (['--cls-image-size', '8'], '--cls-image-size'),
    (['--max-objects', '0'], '--max-objects'), (['--ignore-radius', '3'], '--ignore-radius'),
    (['--seed', '-1'], '--seed'), (['--seed', 'inf'], '--seed'),
    (['--task', 'cityscapes'], '--task'),
]


@pytest.mark.parametrize('argv,option', BAD_CLI_ARGUMENTS, ids=lambda v: ' '.join(v)
                         if isinstance(v, list) else v)
def test_cli_rejects_bad_arguments_with_one_line(tmp_path: Path, capsys, argv, option) -> None:
    gen.generate_all(tmp_path, **TINY_CLS)
    before = _tree_bytes(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        gen.main(['--out', str(tmp_path), *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and 'Traceback' not in captured.err
    assert _tree_bytes(tmp_path) == before


def test_cli_ownership_errors_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    import subprocess
    import sys
    (tmp_path / gen.INFO_FILE).write_text('{"generator": "elsewhere"}')
    proc = subprocess.run([sys.executable, str(REPO / 'tools/datasets/generate_shape_datasets.py'),
                           '--out', str(tmp_path), '--task', 'imagenet', '--cls-num-train', '1'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ''
    assert len(proc.stderr.strip().splitlines()) == 1 and gen.INFO_FILE in proc.stderr
    assert _tree_bytes(tmp_path) == {gen.INFO_FILE: b'{"generator": "elsewhere"}'}


def test_data_written_before_the_generator_moved_is_still_its_own(tmp_path: Path) -> None:
    (tmp_path / gen.INFO_FILE).write_text('{"generator": "sar_backbones.datasets.generate"}')
    gen.generate_imagenet(tmp_path, num_train_per_class=1, num_val_per_class=1, image_size=32)
    info = json.loads((tmp_path / gen.INFO_FILE).read_text())
    assert info['generator'] == gen.GENERATOR and 'imagenet' in info['tasks']

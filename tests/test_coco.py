"""COCO tree resolution (both layouts, pointer files) and annotation loading with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from msdet.data.coco import (
    CategoryMap,
    CocoFormatError,
    load_annotations,
    relative_below,
    resolve_tree,
    validate_tree,
    write_pointer,
)

CATS = [{"id": 9, "name": "dog", "supercategory": "animal"}, {"id": 2, "name": "cat", "supercategory": "animal"},
        {"id": 40, "name": "car", "supercategory": "vehicle"}]


def coco_dict(n_images: int = 3, first_id: int = 100) -> dict:
    images = [{"id": first_id + 7 * i, "file_name": f"{first_id + 7 * i:012d}.jpg", "width": 40 + i, "height": 30}
              for i in range(n_images)]
    anns = []
    for i, img in enumerate(images):
        for k in range(i + 1):
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": CATS[k % 3]["id"],
                         "bbox": [1.0 + k, 2.0, 10.5, 8.0], "area": 84.0, "iscrowd": int(k == 2),
                         "segmentation": [[1, 2, 11, 2, 11, 10]]})
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": CATS}


def make_tree(root: Path, layout: str = "synthetic", n_images: int = 3) -> Path:
    suffix = "2017" if layout == "coco2017" else ""
    (root / "annotations").mkdir(parents=True)
    for split, first in (("train", 100), ("val", 900)):
        data = coco_dict(n_images, first)
        (root / "annotations" / f"instances_{split}{suffix}.json").write_text(json.dumps(data))
        (root / f"{split}{suffix}").mkdir()
        for img in data["images"]:
            ok, buf = cv2.imencode(".jpg", np.full((img["height"], img["width"], 3), 128, np.uint8))
            (root / f"{split}{suffix}" / img["file_name"]).write_bytes(buf.tobytes())
    return root


@pytest.mark.parametrize("layout", ["synthetic", "coco2017"])
def test_resolve_both_layouts(tmp_path, layout):
    root = make_tree(tmp_path / "coco", layout)
    tree = resolve_tree(root)
    suffix = "2017" if layout == "coco2017" else ""
    assert tree.layout == layout
    assert tree["train"].image_dir == root / f"train{suffix}"
    assert tree["val"].annotation_file == root / "annotations" / f"instances_val{suffix}.json"
    assert tree.annotations["val"] == tree["val"].annotation_file and tree.images["train"] == tree["train"].image_dir
    assert validate_tree(tree) == {"train": {"images": 3, "annotations": 6}, "val": {"images": 3, "annotations": 6}}


def test_missing_split_folder_and_annotation_are_named(tmp_path):
    root = make_tree(tmp_path / "coco")
    (root / "val" / "000000000900.jpg").unlink()
    (root / "val" / "000000000907.jpg").unlink()
    (root / "val" / "000000000914.jpg").unlink()
    (root / "val").rmdir()
    with pytest.raises(CocoFormatError, match=r"missing image folder val/"):
        resolve_tree(root)
    (root / "annotations" / "instances_train.json").unlink()
    with pytest.raises(CocoFormatError, match=r"val/.*annotations/instances_train.json|"
                                              r"annotations/instances_train.json.*val/"):
        resolve_tree(root)
    with pytest.raises(CocoFormatError, match="no such directory"):
        resolve_tree(tmp_path / "nowhere")


def test_coco2017_layout_reports_its_own_names(tmp_path):
    root = make_tree(tmp_path / "coco", "coco2017")
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(CocoFormatError, match=r"coco2017 layout.*annotations/instances_val2017.json"):
        resolve_tree(root)


def test_missing_image_file_is_named(tmp_path):
    root = make_tree(tmp_path / "coco")
    (root / "train" / "000000000107.jpg").unlink()
    with pytest.raises(CocoFormatError, match=r"1 image file.*000000000107.jpg"):
        validate_tree(resolve_tree(root))


def test_pointer_uses_tree_in_place(tmp_path):
    target = make_tree(tmp_path / "elsewhere" / "coco", "coco2017")
    root = tmp_path / "data" / "coco"
    write_pointer(root, target)
    assert [p.name for p in root.iterdir()] == ["source.json"]
    assert json.loads((root / "source.json").read_text())["path"] == str(target.resolve())
    tree = resolve_tree(root)
    assert tree.root == target.resolve() and tree.layout == "coco2017"
    assert tree["train"].image_dir == target.resolve() / "train2017"


def test_pointer_must_not_overlap_its_own_folder(tmp_path):
    target = make_tree(tmp_path / "data" / "coco")
    for root in (target, target / "inner", tmp_path / "data"):
        with pytest.raises(CocoFormatError, match="overlaps"):
            write_pointer(root, target)
    assert validate_tree(resolve_tree(target))["train"]["images"] == 3


def test_pointer_to_bad_tree_writes_nothing(tmp_path):
    target = make_tree(tmp_path / "elsewhere")
    (target / "annotations" / "instances_val.json").write_text("")
    root = tmp_path / "data" / "coco"
    with pytest.raises(CocoFormatError, match="instances_val.json: annotation file is empty"):
        write_pointer(root, target)
    assert not root.exists()


def test_annotation_arrays(tmp_path):
    path = tmp_path / "a.json"
    data = coco_dict(4)
    data["images"] = data["images"][::-1]  # order in the file must not matter
    path.write_text(json.dumps(data))
    ann = load_annotations(path)
    assert ann.num_images == 4 and len(ann.ann_ids) == 10
    by_id = {img["id"]: img for img in data["images"]}
    for k, a in enumerate(data["annotations"]):
        row = ann.ann_image_index[k]
        assert ann.image_ids[row] == a["image_id"]
        assert ann.file_names[row] == by_id[a["image_id"]]["file_name"]
        assert ann.widths[row] == by_id[a["image_id"]]["width"]
        assert ann.iscrowd[k] == bool(a["iscrowd"])
        np.testing.assert_array_equal(ann.bboxes[k], a["bbox"])
    assert ann.categories.ids.tolist() == [2, 9, 40]
    assert ann.categories.names == ["cat", "dog", "car"]


def test_category_map_round_trip():
    cmap = CategoryMap(CATS)
    assert cmap.num_classes == 3
    np.testing.assert_array_equal(cmap.to_index([40, 2, 9, 9]), [2, 0, 1, 1])
    np.testing.assert_array_equal(cmap.to_coco_id([2, 0, 1]), [40, 2, 9])
    assert cmap.to_index([40]).dtype == np.int32
    with pytest.raises(CocoFormatError, match="unknown category id 3"):
        cmap.to_index([2, 3])
    with pytest.raises(CocoFormatError, match="duplicate category id 9"):
        CategoryMap(CATS + [{"id": 9, "name": "wolf"}])
    assert cmap.as_list() == [{"id": 2, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 40, "name": "car"}]


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "instances_x.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _broken(mutate) -> dict:
    data = coco_dict()
    mutate(data)
    return data


@pytest.mark.parametrize("content, message", [
    ("", "annotation file is empty"),
    ('{"images": [', "not valid JSON"),
    ("[1, 2]", "top level must be an object"),
    (_broken(lambda d: d.pop("annotations")), "missing key.*annotations"),
    (_broken(lambda d: d.pop("categories")), "missing key.*categories"),
    (_broken(lambda d: d["annotations"][2].update(category_id=5)), "annotation id 3 has unknown category id 5"),
    (_broken(lambda d: d["annotations"][4].update(image_id=12345)), "annotation id 5 refers to unknown image id 12345"),
    (_broken(lambda d: d["annotations"][1].pop("bbox")), r"annotation #1 \(id 2\) has no 'bbox'"),
    (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), "annotation id 1 has a malformed bbox"),
    (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, 3, None])), "annotation id 1 has a malformed bbox"),
    (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, 3, float("nan")])), "id 1 has a non-finite bbox"),
    (_broken(lambda d: d["annotations"][3].update(bbox=[1, 2, 3, "4"])), "annotation id 4 has a malformed bbox"),
    (_broken(lambda d: d["images"][1].update(id=100)), "duplicate image id 100"),
    (_broken(lambda d: d["images"][2].pop("width")), r"image #2 \(id 114\) has no 'width'"),
    (_broken(lambda d: d["images"][0].update(height=0)), "image id 100 has a non-positive size"),
    (_broken(lambda d: d["images"][0].update(id="abc")), "image #0 has a non-integer 'id'"),
    (_broken(lambda d: d["annotations"][5].update(category_id=[1, 2])), "annotation #5 has a non-integer"),
])
def test_bad_annotation_files(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(CocoFormatError, match=message) as info:
        load_annotations(path)
    assert str(path) in str(info.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(CocoFormatError, match="annotation file not found"):
        load_annotations(tmp_path / "nope.json")


@pytest.mark.parametrize("entry, clean", [("a.jpg", "a.jpg"), ("./sub//b.jpg", "sub/b.jpg"),
                                          ("sub/../c.jpg", "c.jpg"), (".", ".")])
def test_relative_below_cleans_paths_that_stay_inside(entry, clean):
    assert relative_below(entry) == clean


@pytest.mark.parametrize("entry, why", [("../a.jpg", "leads outside its folder"), ("sub/../../a.jpg", "leads outside"),
                                        ("..", "leads outside"), ("/etc/a.jpg", "is an absolute path"),
                                        ("C:/data/a.jpg", "is an absolute path"), ("sub\\a.jpg", "backslash"),
                                        ("", "is empty"), ("a\0.jpg", "NUL")])
def test_relative_below_refuses_paths_that_leave(entry, why):
    with pytest.raises(ValueError, match=why):
        relative_below(entry)


def test_file_name_leaving_the_image_folder_is_refused_by_id(tmp_path):
    """A local COCO tree used in place is read by the MindRecord stage: its file names are checked too."""
    data = coco_dict()
    data["images"][1]["file_name"] = "../../../etc/passwd"
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=r"instances.json: image id 107: file_name '../../../etc/passwd' leads "
                                              r"outside its folder"):
        load_annotations(path)

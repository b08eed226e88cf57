import numpy as np
import pytest
import torch
from PIL import Image

from training.backbones import create_backbone, get_spec, preprocess
from training.buffer import ReplayBuffer
from training.data import load_benchmark


def test_digits5_domains_are_deterministic_and_balanced():
    b = load_benchmark("digits5", domains=["sklearn", "printed"], n_test=50)
    again = load_benchmark("digits5", domains=["sklearn", "printed"], n_test=50)
    assert [d.name for d in b.domains] == ["sklearn", "printed"] and b.classes == [str(i) for i in range(10)]
    for d, e in zip(b.domains, again.domains):
        assert d.x_train.dtype == torch.uint8 and d.x_train.shape[1:] == (3, 32, 32)
        assert len(d.y_test) == 50 and torch.equal(d.x_train, e.x_train)
        assert d.y_train.bincount().min() > 50
    assert not torch.equal(b.domains[0].x_test[:5].float().mean(), b.domains[1].x_test[:5].float().mean())
    with pytest.raises(KeyError):
        load_benchmark("digits5", domains=["nope"])
    with pytest.raises(KeyError, match="digits5"):
        load_benchmark("nope")


def test_folder_loader(tmp_path):
    for dom in ("photo", "sketch"):
        for c in ("cat", "dog"):
            (tmp_path / dom / c).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(np.full((10, 12, 3), i * 20, np.uint8)).save(tmp_path / dom / c / f"{i}.png")
    b = load_benchmark("folder", root=str(tmp_path), domains=["sketch", "photo"], test_fraction=0.2)
    assert b.classes == ["cat", "dog"] and [d.name for d in b.domains] == ["sketch", "photo"]
    assert b.domains[0].x_train.shape == (8, 3, 32, 32) and len(b.domains[0].y_test) == 2
    (tmp_path / "photo" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_benchmark("folder", root=str(tmp_path))


def test_buffer_balanced_and_persisted(tmp_path):
    x = torch.randint(0, 255, (30, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(30) % 3
    for policy in ("first", "reservoir"):
        buf = ReplayBuffer(2, policy)
        buf.add("a", x, y)
        buf.add("b", x[:6], y[:6])
        bx, by = buf.tensors()
        assert len(buf) == 12 and by.bincount().tolist() == [4, 4, 4]
        buf.save(str(tmp_path / "buf.safetensors"))
        back = ReplayBuffer.load(str(tmp_path / "buf.safetensors"))
        cx, cy = back.tensors()
        assert torch.equal(bx, cx) and torch.equal(by, cy) and back.domains() == ["a", "b"]
    with pytest.raises(ValueError):
        ReplayBuffer(0)


def test_buffer_holds_one_image_size_and_can_be_resized():
    buf = ReplayBuffer(2)
    buf.add("a", torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4) % 2)
    with pytest.raises(ValueError, match=r"\(3, 64, 64\).*\(3, 32, 32\)"):  # said, not a torch.stack error
        buf.add("b", torch.zeros(4, 3, 64, 64, dtype=torch.uint8), torch.arange(4) % 2)
    assert buf.domains() == ["a"]  # nothing of the refused domain was kept
    buf.map_images(lambda x: torch.nn.functional.interpolate(x.float(), size=64).to(torch.uint8))
    buf.add("b", torch.zeros(4, 3, 64, 64, dtype=torch.uint8), torch.arange(4) % 2)
    assert buf.tensors()[0].shape == (8, 3, 64, 64)


def test_backbone_registry():
    m = create_backbone("vit_test", 7, seed=1)
    spec = get_spec("vit_test")
    out = m(preprocess(spec, torch.zeros(2, 3, 16, 16, dtype=torch.uint8)))
    assert out.shape == (2, 7)
    h1, h2 = create_backbone("vit_test", 7, seed=1).head.weight, create_backbone("vit_test", 7, seed=1).head.weight
    assert torch.equal(h1, h2)
    with pytest.raises(KeyError, match="vit_test"):
        get_spec("nope")
    with pytest.raises(FileNotFoundError):
        create_backbone("vit_test", 2, weights="/nonexistent.safetensors")

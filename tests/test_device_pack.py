"""The packed inputs of a GPU job without internet (``benchmark.perf.device_pack``): MNIST as torchvision's
raw files, read back by torchvision as the same images, and a TorchScript network whose weights are stored as
float16 and come back as float32 copies of the rounded values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.perf import device_pack


def test_idx_files_read_back_by_torchvision_as_the_same_tensors(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2], dtype=torch.uint8)
    (tmp_path / "img").write_bytes(device_pack.idx_bytes(images, 0x803))
    (tmp_path / "lbl").write_bytes(device_pack.idx_bytes(labels, 0x801))
    assert torch.equal(read_image_file(str(tmp_path / "img")), images)
    assert torch.equal(read_label_file(str(tmp_path / "lbl")), labels.long())


def test_a_network_travels_as_float16_and_returns_as_float32_of_the_rounded_weights(tmp_path):
    torch.manual_seed(0)
    net = torch.jit.script(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)))
    torch.jit.save(net, str(tmp_path / "net.pt"))
    packed = device_pack.pack_inception(tmp_path / "net.pt", tmp_path)
    assert packed.name == "inception-fp16.pt.xz" and not (tmp_path / "inception-fp16.pt").exists()
    restored = torch.jit.load(str(device_pack.restored_inception(packed, tmp_path / "back.pt")))
    for (name, a), (_, b) in zip(net.named_parameters(), restored.named_parameters()):
        assert b.dtype == torch.float32 and torch.equal(b, a.half().float()), name
        assert not torch.equal(a, b) or a.abs().max() == 0, name  # rounded, not copied
    x = torch.randn(2, 5)
    torch.testing.assert_close(restored(x), net(x), rtol=1e-2, atol=1e-2)


def test_packing_without_mnist_names_the_missing_argument(tmp_path, capsys):
    with pytest.raises(SystemExit):
        device_pack.main(["--inception", str(tmp_path / "net.pt"), "--out", str(tmp_path)])
    assert "--mnist is required to pack (the path of mnist.pkl.gz)" in capsys.readouterr().err

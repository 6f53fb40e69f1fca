import pytest
import torch
from torch import nn

from orthomod.models import PAPER_DEPTHS, create, list_models


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("depth", PAPER_DEPTHS)
def test_plain_layer_counts(depth):
    model = create(f"plain{depth}")
    assert _count(model, nn.Conv2d) == depth - 1
    assert _count(model, nn.BatchNorm2d) == depth - 1
    assert _count(model, nn.Linear) == 1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert [c.stride[0] for c in convs].count(2) == 2
    n = (depth - 2) // 6
    widths = [c.out_channels for c in convs]
    assert widths == [16] * (1 + 2 * n) + [32] * (2 * n) + [64] * (2 * n)


@pytest.mark.parametrize("depth", PAPER_DEPTHS)
def test_resnet_layer_counts(depth):
    model = create(f"resnet{depth}")
    # main path as in the plain net, plus two 3x3 projection shortcuts where the width doubles
    assert _count(model, nn.Conv2d) == depth - 1 + 2
    assert _count(model, nn.BatchNorm2d) == depth - 1 + 2
    projections = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 2
                   and isinstance(m[0], nn.Conv2d)]
    assert [(p[0].kernel_size, p[0].stride, p[0].out_channels) for p in projections] == [
        ((3, 3), (2, 2), 32), ((3, 3), (2, 2), 64)]


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name):
    torch.manual_seed(0)
    model = create(name)
    x = torch.randn(2, 3, 32, 32)  # the ImageNet nets pool down to 1x1 from 32x32 too
    out = model(x)
    assert out.shape == (2, 1000 if name.startswith("imagenet-") else 10)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_plain_and_resnet_share_main_path_shapes():
    plain = [tuple(m.weight.shape) for m in create("plain32").modules() if isinstance(m, nn.Conv2d)]
    res = [m for m in create("resnet32").modules() if isinstance(m, nn.Conv2d)]
    assert len(res) == len(plain) + 2


def test_any_6n_plus_2_depth_and_num_classes():
    model = create("plain8", num_classes=100)
    assert _count(model, nn.Conv2d) == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", ["plain21", "resnet45", "plain2"])
def test_invalid_depth_says_which_are_valid(name):
    with pytest.raises(ValueError, match=r"depth \d+ is not valid.*6n\+2.*20, 26, 32"):
        create(name)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        create("vgg16")


# ImageNet layouts: convs (stem + blocks + projections) and parameter counts of the standard nets
@pytest.mark.parametrize("depth,blocks_convs,projections,params_m", [
    (34, 32, 3, 21.80), (50, 48, 4, 25.56), (101, 99, 4, 44.55)])
def test_imagenet_layer_counts(depth, blocks_convs, projections, params_m):
    res = create(f"imagenet-resnet{depth}")
    plain = create(f"imagenet-plain{depth}")
    assert _count(res, nn.Conv2d) == 1 + blocks_convs + projections
    assert _count(plain, nn.Conv2d) == 1 + blocks_convs  # depth - 1 convs + 1 linear
    assert _count(plain, nn.Conv2d) + _count(plain, nn.Linear) == depth
    assert _count(plain, nn.BatchNorm2d) == depth - 1 and _count(plain, nn.ReLU) == depth - 1
    assert sum(p.numel() for p in res.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)
    stem = next(m for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and stem.out_channels == 64
    # same main-path layers: the plain twin is the ResNet without its projection shortcuts
    main_path = [tuple(m.weight.shape) for name, m in res.named_modules()
                 if isinstance(m, nn.Conv2d) and "shortcut" not in name]
    assert main_path == [tuple(m.weight.shape) for m in plain.modules() if isinstance(m, nn.Conv2d)]


def test_imagenet_output_and_groupwise_orthonormal_init():
    from orthomod.init import group_slices

    model = create("imagenet-plain50", init="orthonormal", num_classes=7)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)
    expansions = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels > m.weight[0].numel()]
    assert len(expansions) >= 3  # 1x1 expansions (e.g. 256 filters of 64 inputs) are group-wise
    for conv in expansions:
        v = conv.weight.detach().double().reshape(conv.out_channels, -1)
        for s in group_slices(*v.shape):
            g = v[s]
            assert torch.allclose(g @ g.T, torch.eye(g.shape[0], dtype=torch.float64), atol=1e-5)


def test_imagenet_depth_errors():
    with pytest.raises(ValueError, match="depth 44 is not available for the ImageNet nets; choose 34, 50 or 101"):
        create("imagenet-plain44")

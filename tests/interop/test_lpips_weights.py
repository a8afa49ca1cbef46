"""LPIPS weights: the published file formats converted, loaded, and matching a torch LPIPS."""

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from ldm_jax.interop.convert import WeightsMismatchError
from ldm_jax.interop.lpips_weights import convert_lpips, load_lpips, main
from ldm_jax.interop.safetensors_io import PickleRefusedError, read_safetensors, write_safetensors

# torchvision's VGG16 configuration "D": conv widths, "M" a 2x2 max-pool.
VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]
VGG16_CONFIG += [512, 512, 512, "M"]
HEAD_CHANNELS = (64, 128, 256, 512, 512)
# lpips' slices of `features`, ending after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def torch_vgg16_features():
    """torchvision's `vgg16().features`, with He-scaled random weights and random biases."""
    torch.manual_seed(0)
    layers, in_channels = [], 3
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, item, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.normal_(conv.bias, std=0.1)
        layers += [conv, nn.ReLU(inplace=True)]
        in_channels = item
    return nn.Sequential(*layers).eval()


def torch_lpips_heads():
    """The lpips package's non-negative 1x1 convolution weights, (1, C, 1, 1) per layer."""
    generator = torch.Generator().manual_seed(1)
    return [0.1 * torch.rand(1, c, 1, 1, generator=generator) for c in HEAD_CHANNELS]


def torch_lpips(features, heads, images, references):
    """The lpips package's LPIPS forward for net='vgg', on NCHW images in [-1, 1]."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    a, b = (images - shift) / scale, (references - shift) / scale
    total = 0.0
    for (start, stop), weight in zip(LPIPS_SLICES, heads, strict=True):
        a, b = features[start:stop](a), features[start:stop](b)
        normalized_a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        normalized_b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        weighted = nn.functional.conv2d((normalized_a - normalized_b) ** 2, weight)
        total = total + weighted.mean(dim=(2, 3), keepdim=True)
    return total[:, 0, 0, 0]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The two published files as `torch.save` writes them, and our converted file."""
    root = tmp_path_factory.mktemp("lpips")
    features, heads = torch_vgg16_features(), torch_lpips_heads()
    vgg_state = {f"features.{name}": value for name, value in features.state_dict().items()}
    vgg_state["classifier.0.weight"] = torch.zeros(8, 4)  # torchvision's head, unused
    torch.save(vgg_state, root / "vgg16-397923af.pth")
    heads_state = {f"lin{k}.model.1.weight": weight for k, weight in enumerate(heads)}
    torch.save(heads_state, root / "vgg.pth")
    convert_lpips(root / "vgg16-397923af.pth", root / "vgg.pth", root / "lpips.safetensors")
    return root, features, heads, vgg_state, heads_state


def test_loaded_lpips_matches_torch_reference(published):
    root, features, heads, _, _ = published
    module, params = load_lpips(root / "lpips.safetensors")
    rng = np.random.default_rng(0)
    images, references = rng.uniform(-1, 1, (2, 2, 32, 48, 3)).astype(np.float32)
    ours = jax.jit(module.apply)({"params": params}, images, references)
    with torch.no_grad():
        theirs = torch_lpips(
            features,
            heads,
            torch.from_numpy(images).permute(0, 3, 1, 2),
            torch.from_numpy(references).permute(0, 3, 1, 2),
        ).numpy()
    assert np.all(theirs > 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_command_line_converts_a_safetensors_vgg(published, tmp_path, capsys):
    root, _, _, vgg_state, _ = published
    safetensors.torch.save_file(vgg_state, tmp_path / "vgg16.safetensors")
    out = tmp_path / "converted" / "lpips_vgg.safetensors"
    main([f"--vgg={tmp_path / 'vgg16.safetensors'}", f"--heads={root / 'vgg.pth'}", f"--out={out}"])
    assert f"wrote {out} (31 tensors" in capsys.readouterr().out
    converted, reference = (
        read_safetensors(str(out)),
        read_safetensors(str(root / "lpips.safetensors")),
    )
    assert converted.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(converted[name], reference[name], err_msg=name)


def test_missing_tensor_is_named_with_the_conversion_command(published, tmp_path):
    root = published[0]
    tensors = read_safetensors(str(root / "lpips.safetensors"))
    del tensors["lin_3.kernel"]
    path = tmp_path / "incomplete.safetensors"
    write_safetensors(tensors, str(path))
    with pytest.raises(WeightsMismatchError) as error:
        load_lpips(path)
    message = str(error.value)
    assert "'lin_3.kernel'" in message and str(path) in message
    assert "python -m ldm_jax.interop.lpips_weights --vgg=" in message


def test_pickled_weights_are_refused_with_the_conversion_command(published):
    vgg_pth = published[0] / "vgg16-397923af.pth"
    with pytest.raises(PickleRefusedError, match="python -m ldm_jax.interop.lpips_weights"):
        load_lpips(vgg_pth)


def test_swapped_inputs_name_the_flag(published, tmp_path):
    root = published[0]
    with pytest.raises(WeightsMismatchError, match=r"--vgg=.*vgg\.pth has no 'features\.\*'"):
        convert_lpips(root / "vgg.pth", root / "vgg16-397923af.pth", tmp_path / "out.safetensors")


def test_heads_of_another_network_are_refused_naming_the_tensor(published, tmp_path):
    root = published[0]
    alex_channels = (64, 192, 384, 256, 256)
    torch.save(
        {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(alex_channels)},
        tmp_path / "alex.pth",
    )
    with pytest.raises(WeightsMismatchError, match=r"'lin1\.model\.1\.weight' has shape \(1, 192"):
        convert_lpips(root / "vgg16-397923af.pth", tmp_path / "alex.pth", tmp_path / "out.st")

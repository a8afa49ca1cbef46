"""The FID Inception converter: the published .pth layout in, one safetensors file out, read
back without torch; pickles and foreign files refused with the command that fixes them."""

import numpy as np
import pytest
import torch
from inception_reference import FIDInception, randomized

from ldm_jax.interop.convert import WeightsMismatchError
from ldm_jax.interop.inception_weights import (
    inception_param_shapes,
    load_inception,
    main,
)
from ldm_jax.interop.safetensors_io import PickleRefusedError, write_safetensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("inception")
    reference = randomized(FIDInception())
    pth = root / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(reference.state_dict(), pth)
    out = root / "inception.safetensors"
    main([f"--pt={pth}", f"--out={out}"])
    return reference, pth, out


def test_converted_file_holds_every_tensor_in_flax_layout(converted):
    reference, _, out = converted
    module, params = load_inception(out)
    state = reference.state_dict()
    kernel = params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    torch_weight = state["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # (out, in, 1, 7)
    np.testing.assert_array_equal(kernel, torch_weight.transpose(2, 3, 1, 0))
    bn = params["Conv2d_1a_3x3"]["bn"]
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("running_var", "running_var")):
        np.testing.assert_array_equal(bn[ours], state[f"Conv2d_1a_3x3.bn.{theirs}"].numpy())
    assert "fc" not in params


def test_pickled_weights_are_refused_at_run_time(converted):
    _, pth, _ = converted
    with pytest.raises(PickleRefusedError, match="python -m ldm_jax.interop.inception_weights"):
        load_inception(pth)


def test_missing_and_foreign_files_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception_weights=.*not found"):
        load_inception(tmp_path / "nowhere.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    write_safetensors({"conv.weight": np.zeros((2, 2), np.float32)}, str(foreign))
    with pytest.raises(WeightsMismatchError, match="not a file written by the Inception converter"):
        load_inception(foreign)


def test_converter_names_a_tensor_of_the_wrong_shape(tmp_path):
    state = {name: np.zeros(shape, np.float32) for name, shape in _torch_shapes().items()}
    state["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 3, 1, 1), np.float32)
    source = tmp_path / "bad.safetensors"
    write_safetensors(state, str(source))
    with pytest.raises(SystemExit, match="Mixed_5b.branch1x1.conv.weight"):
        main([f"--pt={source}", f"--out={tmp_path / 'out.safetensors'}"])


def _torch_shapes():
    shapes = {}
    for name, shape in inception_param_shapes().items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "kernel":
            shapes[f"{module}.weight"] = (shape[3], shape[2], shape[0], shape[1])
        else:
            shapes[f"{module}.{'weight' if leaf == 'scale' else leaf}"] = shape
    return shapes

import pytest
from conftest import load_config

from ldm_jax import config as config_lib


def test_quickstart_and_its_variants_validate():
    for variant in (None, "tiny", "class"):
        config_lib.validate(load_config("quickstart", variant), num_devices=8)
    config_lib.validate(load_config("quickstart"), num_devices=1)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        load_config("quickstart", "huge")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("diffusion.train.batch_size", 12, r"batch_size=12 is not divisible by .* 8 shards"),
        ("data.image_size", 31, r"image_size=31 is not divisible by the autoencoder factor f=2"),
        ("sample.sampler", "euler", r"config.sample.sampler='euler' is not allowed"),
        ("diffusion.schedule", "sigmoid", r"config.diffusion.schedule='sigmoid'"),
        ("stage", "three", r"config.stage='three'"),
        ("mesh.data", 3, r"set --config.mesh"),
        ("autoencoder.model.norm_num_groups", 24, r"norm_num_groups=24 must divide"),
        ("diffusion.cond_drop_prob", 1.5, r"cond_drop_prob=1.5 must be in \[0, 1\)"),
        ("sample.num_steps", 0, r"num_steps=0 must be in"),
    ],
)
def test_validate_names_the_key_and_the_fix(tiny_config, key, value, message):
    section, _, leaf = key.rpartition(".")
    _get(tiny_config, section)[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(tiny_config, num_devices=8)


def _get(config, dotted):
    for part in filter(None, dotted.split(".")):
        config = config[part]
    return config


def test_missing_dataset_path_names_the_flag(tiny_config, tmp_path):
    tiny_config.data.source = "image_folder"
    with pytest.raises(config_lib.ConfigError, match="set --config.data.path"):
        config_lib.validate(tiny_config, num_devices=8)
    tiny_config.data.path = str(tmp_path / "missing")
    with pytest.raises(config_lib.ConfigError, match="--config.data.path"):
        config_lib.validate(tiny_config, num_devices=8)


def test_json_round_trip_restores_tuples(tiny_config):
    restored = config_lib.from_json(config_lib.to_json(tiny_config))
    assert restored.to_dict() == tiny_config.to_dict()
    assert restored.diffusion.unet.block_out_channels == (16, 32)
    assert restored.mesh.axis_rules[0] == ("batch", ("data", "fsdp"))

"""Sampling options come from one place: the config's `sample` block, with overrides."""

import dataclasses

import pytest

from ldm_jax.config import base_config
from ldm_jax.pipeline.generator import CONFIG_OPTIONS, SamplingOptions, sampling_options


def test_defaults_are_the_config_sample_block_and_none_means_unset():
    sample = base_config().sample
    sample.guidance_scale, sample.sampler = 6.5, "dpmpp_2m"
    options = sampling_options(sample, guidance_scale=None, num_steps=None)
    assert options.guidance_scale == 6.5 and options.sampler == "dpmpp_2m"
    assert options.num_steps == sample.num_steps
    assert (options.mode, options.strength, options.paste_back) == ("txt2img", 1.0, True)
    assert sampling_options(sample, guidance_scale=2).guidance_scale == 2.0


def test_no_option_has_a_default_of_its_own_beside_the_config():
    """A default written twice drifts apart: the dataclass holds none."""
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(SamplingOptions))
    assert set(CONFIG_OPTIONS) <= set(base_config().sample)


def test_strength_defaults_by_mode_and_unknown_overrides_are_refused():
    sample = base_config().sample
    assert sampling_options(sample, mode="img2img").strength == 0.8
    assert sampling_options(sample, mode="inpaint").strength == 1.0
    assert sampling_options(sample, mode="img2img", strength=0.3).strength == 0.3
    with pytest.raises(TypeError, match="guidance"):
        sampling_options(sample, guidance=3.0)

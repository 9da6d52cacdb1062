"""Tests of mamba_config.py: the sizes MambaConfig derives, its checks of impossible values, and param_count
against a built model."""
import dataclasses

import pytest

from mamba_config import MambaConfig, param_count
from models import small_model

# ---- parameters -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False), dict(bias=True, conv_bias=False, dt_rank=5),
                                       dict(expand=3, d_state=4, d_conv=2, pad_vocab_size_multiple=1)])
def test_parameter_count_matches_the_formula(overrides):
    model = small_model(**overrides)
    distinct = {p.data_ptr(): p.numel() for p in model.state_dict().values()}  # tied weights: one storage
    assert model.num_params() == param_count(model.config) == sum(distinct.values())
    assert (model.lm_head.weight is model.backbone.embedding.weight) == model.config.tie_embeddings


# ---- config -----------------------------------------------------------------------------------------------------

def test_config_derived_sizes_and_field_docs():
    config = MambaConfig(d_model=33, n_layer=1, vocab_size=50, expand=3)
    assert (config.d_inner, config.dt_rank_value, config.padded_vocab_size) == (99, 3, 56)
    assert MambaConfig(d_model=32, n_layer=1, vocab_size=48, dt_rank=7).dt_rank_value == 7
    assert MambaConfig(d_model=32, n_layer=1, vocab_size=48).padded_vocab_size == 48
    for f in dataclasses.fields(MambaConfig):
        assert f.metadata.get("doc"), f.name


@pytest.mark.parametrize("field, value", [
    ("d_model", 0), ("n_layer", -1), ("vocab_size", 0), ("d_state", 0), ("d_conv", 0), ("expand", 0),
    ("expand", 1.5), ("dt_rank", 0), ("dt_rank", "big"), ("dt_min", 0.0), ("dt_max", 1e-4), ("dt_scale", 0.0),
    ("dt_init_floor", -1.0), ("norm_eps", 0.0), ("pad_vocab_size_multiple", 0), ("scan", "slow"), ("d_model", True),
])
def test_config_rejects_impossible_values(field, value):
    with pytest.raises(ValueError, match=field):
        MambaConfig(**{"d_model": 32, "n_layer": 2, "vocab_size": 50, field: value})

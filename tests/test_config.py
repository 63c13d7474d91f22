"""Every invalid config value raises a ConfigError naming the dotted field."""

import dataclasses

import pytest

from horizon.config import Attention, Data, Experiment, Mesh, Model, Optim, Quant, from_dict, to_dict
from horizon.errors import ConfigError


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Model(d_model=100, n_heads=3), "model.n_heads"),
        (lambda: Model(n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
        (lambda: Data(seq_len=0), "data.seq_len"),
        (lambda: Optim(lr=0.0), "optim.lr"),
        (lambda: Optim(lr=-1e-3), "optim.lr"),
        (lambda: Model(layer_pattern="attn,convolution"), "model.layer_pattern"),
        (lambda: Model(quant=Quant(recipe="nvfp5")), "model.quant.recipe"),
        (lambda: Model(quant=Quant(high_precision_from=1.5)), "model.quant.high_precision_from"),
        (lambda: Experiment(model=Model(attention=Attention(policy="sliding_window", block=64)),
                            data=Data(seq_len=100)), "data.seq_len"),
    ],
)
def test_bad_value_raises_config_error_naming_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


def test_mesh_must_multiply_to_device_count():
    with pytest.raises(ConfigError, match="mesh"):
        Mesh(data=3, fsdp=1).shape(8)
    with pytest.raises(ConfigError, match="mesh"):
        Mesh(data=-1, fsdp=3).shape(8)
    assert Mesh(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2, 1)
    assert Mesh(data=-1, tensor=2).shape(8) == (4, 1, 2, 1)


def test_layer_pattern_repeats_cyclically():
    assert Model(n_layers=5, layer_pattern="ssd,ssd,attn").mixers == ("ssd", "ssd", "attn", "ssd", "ssd")


def test_config_round_trips_through_dict():
    cfg = Experiment(model=Model(d_model=64, n_heads=2), optim=Optim(lr=1e-3, schedule="wsd"))
    assert from_dict(Experiment, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown fields"):
        from_dict(Experiment, {**to_dict(cfg), "bogus": 1})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Model().d_model = 3

"""A base that does not fit the model the flags build is refused before loading, naming each
tensor, both shapes and the flags to check; a norm saved under the other Megatron spec's name
(local vs Transformer Engine) is found under that name."""

from types import SimpleNamespace

import pytest
import torch

from megatron_drlora.checkpoint import CheckpointError, alias_norm_keys, check_base_fits


def _sharded(key, shape):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, torch.zeros(shape), replica_id=0)


def _meta(shapes):
    return {k: SimpleNamespace(global_shape=s) for k, s in shapes.items()}


MODEL = {"embedding.word_embeddings.weight": (128, 32),
         "decoder.layers.0.self_attention.linear_qkv.weight": (96, 32),
         "decoder.layers.0.mlp.experts.experts.linear_fc1.weight": (4, 64, 32),
         "decoder.layers.0.pre_mlp_layernorm.weight": (32,)}


def _request():
    return {f"t{i}": _sharded(k, s) for i, (k, s) in enumerate(MODEL.items())}


def test_a_fitting_base_passes_and_vocabulary_rows_may_differ():
    base = dict(MODEL, **{"embedding.word_embeddings.weight": (96, 32),
                          "optimizer.state.exp_avg.decoder.x": (3,),
                          # the distributed optimizer's and a chained optimizer's own keys
                          "chained_1.optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_"
                          "(torch.float32, torch.float32).bucket_idx_0.exp_avg": (4096,),
                          "rng_state": (2,)})
    check_base_fits(_request(), _meta(base), "BASE")


def test_each_misfit_is_named_with_shapes_and_flags():
    base = dict(MODEL)
    base["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"] = (8, 64, 32)
    base["decoder.layers.0.self_attention.q_layernorm.weight"] = (32,)
    del base["decoder.layers.0.self_attention.linear_qkv.weight"]
    with pytest.raises(CheckpointError) as err:
        check_base_fits(_request(), _meta(base), "BASE")
    text = str(err.value)
    assert "--pretrained-checkpoint BASE does not fit" in text
    assert ("decoder.layers.0.mlp.experts.experts.linear_fc1.weight: (8, 64, 32) in the base, "
            "(4, 64, 32) with these flags (--num-experts" in text)
    assert ("the base has decoder.layers.0.self_attention.q_layernorm.weight (32,), which these "
            "flags do not build (--qk-layernorm" in text)
    assert "linear_qkv.weight (96, 32) is not in the base (--hidden-size" in text
    assert "BASE/model.args" in text


def test_pre_mlp_norm_of_the_other_spec_is_requested_by_its_name():
    base = dict(MODEL)
    base["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] = base.pop(
        "decoder.layers.0.pre_mlp_layernorm.weight")
    request = _request()
    assert alias_norm_keys(request, _meta(base)) == 1
    assert request["t3"].key == "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    check_base_fits(request, _meta(base), "BASE")
    # and the other way round
    request = {"n": _sharded("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", (32,))}
    assert alias_norm_keys(request, _meta({"decoder.layers.0.pre_mlp_layernorm.weight": (32,)}))
    assert request["n"].key == "decoder.layers.0.pre_mlp_layernorm.weight"

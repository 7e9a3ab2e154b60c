import pytest
import torch

from scaletrain.configs.schema import OptimConfig
from scaletrain.errors import ConfigError
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.train.optim import build_optimizer, uses_weight_decay


def _groups_by_decay(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {group["weight_decay"]: sorted(names[id(p)] for p in group["params"]) for group in optimizer.param_groups}


def test_no_decay_on_norms_biases_and_position_tables():
    model = build_model(load_model_config("bert_tiny"), "cpu")
    groups = _groups_by_decay(model, build_optimizer(model, OptimConfig(weight_decay=0.1)))
    no_decay, decay = groups[0.0], groups[0.1]
    assert "pos_embeddings.weight" in no_decay and "type_embeddings.weight" in no_decay
    assert "layers.0.attn_norm.weight" in no_decay and "layers.0.attn.q_proj.bias" in no_decay
    assert "tok_embeddings.weight" in decay and "layers.1.mlp.fc_in.weight" in decay
    assert all(not n.endswith("bias") and "norm" not in n for n in decay)
    assert len(no_decay) + len(decay) == len(list(model.parameters()))  # the tied head counted once


def test_t5_relative_bias_is_not_decayed():
    model = build_model(load_model_config("t5_tiny"), "cpu")
    for name, param in model.named_parameters():
        if "relative_bias" in name:
            assert not uses_weight_decay(name, param)


def test_decay_shrinks_only_the_decayed_group():
    # With zero gradients an AdamW step is pure decoupled decay: p <- p * (1 - lr * wd).
    model = build_model(load_model_config("gpt_tiny"), "cpu")
    cfg = OptimConfig(lr=0.5, weight_decay=0.2)
    optimizer = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1 - 0.5 * 0.2 if uses_weight_decay(name, param) else 1.0
        assert torch.allclose(param, before[name] * factor, rtol=0, atol=1e-7), name


def test_implementation_choice_on_cpu():
    model = torch.nn.Linear(4, 4)
    adamw = build_optimizer(model, OptimConfig())  # torch's fused AdamW has a CPU kernel: the default
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] and not adamw.defaults["foreach"]
    foreach = build_optimizer(model, OptimConfig(implementation="foreach"))
    assert foreach.defaults["foreach"] and not foreach.defaults["fused"]
    sgd = build_optimizer(model, OptimConfig(name="sgd", momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["foreach"]
    with pytest.raises(ConfigError, match="fused has no kernel for parameters on meta"):
        build_optimizer(torch.nn.Linear(4, 4, device="meta"), OptimConfig(implementation="fused"))


def test_fused_and_foreach_adamw_take_the_same_steps():
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 8) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, OptimConfig(implementation=kind, weight_decay=0.1))
                  for m, kind in zip(models, ("fused", "foreach"))]
    for _ in range(3):
        x = torch.randn(4, 8)
        for model, optimizer in zip(models, optimizers):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

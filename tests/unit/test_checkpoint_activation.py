import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scaletrain.models.registry import build_model, load_model_config
from scaletrain.parallel.checkpointing import apply_activation_checkpointing


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _run(name, mode):
    cfg = load_model_config(name, {"dropout": 0.1, "attn_dropout": 0.1})
    model = build_model(cfg, "cpu")
    apply_activation_checkpointing(model, mode)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1, 200, (2, 16))}
    if cfg.family == "encdec":
        batch["decoder_input_ids"] = torch.randint(1, 200, (2, 8))
    out = model(**batch)
    loss = (out[0] if isinstance(out, tuple) else out).square().mean()
    with OpCounter() as backward_ops:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, grads, backward_ops.counts


@pytest.mark.parametrize("name", ["gpt_tiny", "t5_tiny"])
def test_checkpointing_gives_bitwise_equal_gradients_and_keeps_names(name):
    reference_model, reference, plain_ops = _run(name, "none")
    for mode in ("full", "selective"):
        model, grads, ops = _run(name, mode)
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference_model.named_parameters()]
        for key, grad in reference.items():
            assert torch.equal(grads[key], grad), (mode, key)


def test_full_recomputes_matmuls_and_selective_only_the_cheap_ops():
    _, _, plain = _run("gpt_tiny", "none")
    _, _, full = _run("gpt_tiny", "full")
    _, _, selective = _run("gpt_tiny", "selective")
    matmuls = lambda counts: counts.get("addmm", 0) + counts.get("mm", 0)  # noqa: E731
    assert plain.get("native_layer_norm", 0) == 0  # without checkpointing no forward op reruns
    assert full.get("native_layer_norm", 0) > 0 and selective.get("native_layer_norm", 0) > 0
    assert matmuls(full) > matmuls(plain) and matmuls(selective) == matmuls(plain)


def test_unknown_mode_and_double_application_are_refused():
    model = build_model(load_model_config("gpt_tiny"), "cpu")
    with pytest.raises(ValueError, match="not one of"):
        apply_activation_checkpointing(model, "some")
    apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="already has"):
        apply_activation_checkpointing(model, "selective")

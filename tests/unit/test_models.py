"""Model zoo behaviour: shapes, masking, initialization, pipeline-style deletion, losses, and the shared
blocks against formulas written independently here."""

import math

import pytest
import torch
import torch.nn.functional as F

from scaletrain.models.blocks import SinusoidalPositions, relative_position_bucket, rms_norm
from scaletrain.models.registry import build_model, get_spec, load_model_config

TINY = ["gpt_tiny", "bert_tiny", "t5_tiny", "t5_v1_1_tiny", "bart_tiny", "transformer_tiny"]


def materialize(name, seed=0, **overrides):
    cfg = load_model_config(name, overrides)
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model.eval()


def run(model, ids, mask=None, dec=None, dec_mask=None):
    family = model.cfg.family
    if family == "gpt":
        return model(ids, attention_mask=mask)
    if family == "bert":
        return model(ids, attention_mask=mask)[0]
    return model(ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask)


def token_ids(*shape, low=3, high=256, seed=0):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_classifier(name):
    model = materialize(name, num_labels=3)
    ids, dec = token_ids(2, 10), token_ids(2, 7, seed=1)
    logits = run(model, ids, dec=dec)
    expected_len = 10 if model.cfg.family != "encdec" else 7
    assert logits.shape == (2, expected_len, model.cfg.vocab_size)
    assert torch.isfinite(logits).all()
    extra = (dec,) if model.cfg.family == "encdec" else ()
    assert model.classify(ids, *extra).shape == (2, 3)


def test_bert_nsp_logits_and_no_nsp_variant():
    mlm, nsp = materialize("bert_tiny")(token_ids(2, 9), torch.zeros(2, 9, dtype=torch.long))
    assert mlm.shape == (2, 9, 256) and nsp.shape == (2, 2)
    assert materialize("bert_tiny", nsp_head=False)(token_ids(2, 9))[1] is None


@pytest.mark.parametrize("name", ["gpt_tiny", "t5_tiny", "bart_tiny", "transformer_tiny"])
def test_decoder_is_causal(name):
    model = materialize(name)
    ids, dec = token_ids(1, 10), token_ids(1, 10, seed=1)
    target = dec if model.cfg.family == "encdec" else ids
    changed = target.clone()
    changed[0, 6] = 3 if target[0, 6] != 3 else 4
    if model.cfg.family == "encdec":
        before, after = run(model, ids, dec=dec), run(model, ids, dec=changed)
    else:
        before, after = run(model, ids), run(model, changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=0)
    assert (before[:, 6:] - after[:, 6:]).abs().max() > 1e-4  # the change is seen from position 6 on


def test_encoder_is_bidirectional():
    model = materialize("bert_tiny")
    ids = token_ids(1, 10)
    changed = ids.clone()
    changed[0, 8] = 7 if ids[0, 8] != 7 else 8
    assert (run(model, ids)[:, 0] - run(model, changed)[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("name", TINY)
def test_padding_matches_the_unpadded_sequence(name):
    """Row 1 is a 6-token input padded to 10: its real positions must equal a run on the 6 tokens alone."""
    model = materialize(name)
    pad = model.cfg.pad_token_id
    ids, dec = token_ids(2, 10), token_ids(2, 8, seed=1)
    ids[1, 6:] = pad
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    if model.cfg.family == "encdec":
        dec[1, 5:] = pad
        dec_mask = torch.ones(2, 8, dtype=torch.long)
        dec_mask[1, 5:] = 0
        padded = run(model, ids, mask, dec, dec_mask)[1, :5]
        alone = run(model, ids[1:, :6], None, dec[1:, :5])[0]
    else:
        padded = run(model, ids, mask)[1, :6]
        alone = run(model, ids[1:, :6])[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_decoder_padding_mask_hides_masked_keys():
    model = materialize("gpt_tiny")
    ids = token_ids(1, 8)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 2] = 0
    full, masked = run(model, ids), run(model, ids, mask)
    torch.testing.assert_close(full[:, :2], masked[:, :2], rtol=0, atol=0)
    assert (full[:, 3:] - masked[:, 3:]).abs().min() > 0  # every later query lost a key
    changed = ids.clone()
    changed[0, 2] = 3 if ids[0, 2] != 3 else 4  # a masked key's token cannot matter to later queries
    torch.testing.assert_close(run(model, changed, mask)[:, 3:], masked[:, 3:], rtol=1e-6, atol=1e-6)


def test_gpt_classifier_reads_the_last_real_token():
    model = materialize("gpt_tiny", num_labels=2)
    ids = token_ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    scores = model.classify(ids, attention_mask=mask)
    torch.testing.assert_close(scores[1], model.classify(ids[1:, :5])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_init_is_deterministic_and_seeded(name):
    first, again, other = materialize(name, seed=3), materialize(name, seed=3), materialize(name, seed=4)
    for (key, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), key
    differs = [k for (k, a), c in zip(first.named_parameters(), other.parameters()) if not torch.equal(a, c)]
    assert len(differs) > len(list(first.parameters())) // 3  # weights move with the seed (norms stay 1/0)


def test_init_does_not_depend_on_layout_or_building_order():
    full = materialize("gpt_tiny", seed=7)
    _ = materialize("bert_tiny", seed=7)  # advance any global RNG: values must not depend on it
    torch.manual_seed(12345)
    stage = build_model(load_model_config("gpt_tiny"))
    del stage.layers["0"]
    stage.tok_embeddings, stage.pos_embeddings = None, None  # a last pipeline stage: layers 1.., norm, head
    stage.to_empty(device="cpu")
    stage.init_weights(7)
    reference = dict(full.named_parameters())
    names = [name for name, _ in stage.named_parameters()]
    assert names[0].startswith("layers.1.") and "lm_head.weight" in names
    for name, param in stage.named_parameters():
        expected = reference["tok_embeddings.weight" if name == "lm_head.weight" else name]
        assert torch.equal(param, expected), name


def test_deleted_layers_keep_names_and_the_rest_still_runs():
    full = materialize("gpt_tiny")
    first = build_model(full.cfg)
    del first.layers["1"]
    first.final_norm, first.lm_head = None, None  # first stage: embeddings + layer 0, returns hidden states
    second = build_model(full.cfg)
    del second.layers["0"]
    second.tok_embeddings = second.pos_embeddings = None
    for stage in (first, second):
        stage.to_empty(device="cpu")
        stage.init_weights(0)
        stage.eval()
    assert set(first.layers) == {"0"} and set(second.layers) == {"1"}
    ids = token_ids(2, 9)
    hidden = first(ids)
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(second(hidden), full(ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny", "bart_tiny"])
def test_tied_head_stays_tied_after_to_empty_and_init(name):
    model = materialize(name)  # to_empty() from meta makes new Parameters; init_weights ties them again
    head = model.mlm_head.decoder if model.cfg.family == "bert" else model.lm_head
    assert head.weight is model.tok_embeddings.weight
    untied = materialize("t5_v1_1_tiny")
    assert untied.lm_head.weight is not untied.tok_embeddings.weight


def test_build_on_cpu_initializes_like_meta_then_init():
    cfg = load_model_config("bart_tiny")
    direct = build_model(cfg, device="cpu")
    for (name, a), b in zip(direct.state_dict().items(), materialize("bart_tiny").state_dict().values()):
        assert torch.equal(a, b), name


def test_init_statistics_follow_the_reference_recipes():
    gpt = materialize("gpt_cpu_small")  # GPT-2 recipe: N(0, 0.02), residual projections / sqrt(2 n_layers)
    assert abs(gpt.layers["0"].attn.q_proj.weight.std().item() - 0.02) < 0.02 * 0.02
    expected = 0.02 / math.sqrt(2 * 4)
    assert abs(gpt.layers["3"].mlp.fc_out.weight.std().item() - expected) < expected * 0.02
    assert torch.equal(gpt.layers["0"].attn.q_proj.bias, torch.zeros(256))
    assert torch.equal(gpt.final_norm.weight, torch.ones(256))
    t5 = materialize("t5_tiny", d_model=64, d_ff=256)  # Mesh-TF factors
    q = t5.encoder.layers["0"].attn.q_proj.weight  # (H*Dh, D) = (64, 64)
    assert abs(q.std().item() - (64 * 16) ** -0.5) < (64 * 16) ** -0.5 * 0.1
    fc_out = t5.decoder.layers["1"].mlp.fc_out.weight  # (D, d_ff)
    assert abs(fc_out.std().item() - 256**-0.5) < 256**-0.5 * 0.05
    assert abs(t5.tok_embeddings.weight.std().item() - 1.0) < 0.05
    bert = materialize("bert_tiny")
    assert torch.equal(bert.tok_embeddings.weight[0], torch.zeros(32))  # the padding row


def test_sinusoidal_buffer_is_recreated_after_to_empty():
    model = materialize("transformer_tiny")
    table = model.encoder.pos_embeddings.table
    for pos, i in [(0, 0), (3, 0), (5, 1), (7, 10), (40, 31)]:
        angle = pos / 10000 ** ((i - i % 2) / 32)
        expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
        assert abs(table[pos, i].item() - expected) < 1e-5
    assert not any(name.endswith("table") for name in model.state_dict())  # no parameters, not saved
    assert torch.equal(SinusoidalPositions(64, 32).table, table)


def test_relative_buckets_against_the_definition():
    """T5: exact buckets below n/2, log-spaced up to max_distance, keys after the query in the upper half."""
    def bucket(rel, bidirectional, n=32, max_distance=128):
        offset = 0
        if bidirectional:
            n //= 2
            offset = n if rel > 0 else 0
            rel = abs(rel)
        else:
            rel = max(-rel, 0)
        exact = n // 2
        if rel < exact:
            return offset + rel
        return offset + min(n - 1, exact + int(math.log(rel / exact) / math.log(max_distance / exact) * (n - exact)))

    relative = torch.arange(-300, 300)
    for bidirectional in (True, False):
        ours = relative_position_bucket(relative, bidirectional, 32, 128).tolist()
        assert ours == [bucket(r, bidirectional) for r in relative.tolist()]


def test_rms_norm_has_no_mean_and_no_bias():
    x = torch.randn(3, 5, 8) + 4.0
    weight = torch.rand(8)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), expected)


def test_t5_runs_unscaled_attention_with_wider_inner_dim():
    model = materialize("t5_tiny")
    attn = model.encoder.layers["0"].attn
    assert attn.q_proj.weight.shape == (4 * 16, 32) and attn.scale == 1.0  # H*Dh = 64 != d_model 32


def test_losses_sum_over_labels_and_count_them():
    model = materialize("gpt_tiny")
    ids = token_ids(2, 8)
    labels = token_ids(2, 8, seed=5)
    labels[0, :3] = -100
    logits = model(ids)
    loss_sum, count = get_spec("gpt").loss_fn(logits, {"input_ids": ids, "labels": labels})
    mean = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), ignore_index=-100)
    assert count.item() == 13
    torch.testing.assert_close(loss_sum / count, mean)


def test_bert_loss_adds_nsp_as_one_prediction_per_sequence():
    model = materialize("bert_tiny")
    ids, labels = token_ids(2, 8), torch.full((2, 8), -100)
    labels[:, 2] = torch.tensor([5, 9])
    outputs = model(ids)
    nsp_label = torch.tensor([0, 1])
    loss_sum, count = get_spec("bert").loss_fn(outputs, {"labels": labels, "next_sentence_label": nsp_label})
    mlm = F.cross_entropy(outputs[0][:, 2], labels[:, 2], reduction="sum")
    nsp = F.cross_entropy(outputs[1], nsp_label, reduction="sum")
    assert count.item() == 4
    torch.testing.assert_close(loss_sum, mlm + nsp)
    loss_sum, count = get_spec("bert").loss_fn(outputs, {"labels": labels})
    assert count.item() == 2 and torch.allclose(loss_sum, mlm)


def test_bert_head_on_labelled_positions_only_gives_the_full_head_loss_and_gradients():
    model = materialize("bert_tiny")
    ids, labels = token_ids(2, 8), torch.full((2, 8), -100)
    labels[0, [1, 6]], labels[1, 3] = torch.tensor([5, 9]), 11
    batch = {"labels": labels, "next_sentence_label": torch.tensor([0, 1])}
    results = []
    for passed in (None, labels):
        model.zero_grad()
        outputs = model(ids, labels=passed)
        loss_sum, count = get_spec("bert").loss_fn(outputs, batch)
        loss_sum.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((outputs[0].shape, loss_sum.detach(), count, grads))
    (full_shape, full_loss, full_count, full_grads), (compact_shape, loss, count, grads) = results
    assert full_shape == (2, 8, model.cfg.vocab_size) and compact_shape == (3, model.cfg.vocab_size)
    assert count == full_count == 5  # 3 masked tokens + 2 NSP predictions
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)  # fp32: another summation order
    for name, grad in full_grads.items():
        # gradients of order 1 summed in another order: fp32 rounding reaches a few 1e-7 (seen 7e-7)
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=2e-6, msg=name)

"""XLNet against Hugging Face's implementation: tiny random XLNetLMHeadModel / XLNetForSequenceClassification
imported with from_hf_model give the same logits (fp32, 1e-4) with perm_mask, target_mapping, token types and
mems over two segments, for bidirectional, unidirectional and bi_data relative positions; our model exported
with to_hf_model gives our logits in transformers; parameter counts equal HF's; the two streams keep a
target's own content out of its prediction."""

import pytest
import torch
import transformers

from scaletrain.models.hf import from_hf_model, hf_class_for, to_hf_model
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.models.table import table_row
from scaletrain.models.xlnet import relative_shift

from random_weights import randomized

VOCAB, TOL = 97, 1e-4


def randomize_(model, seed=0):
    return randomized(model, seed, scale=0.15)


def hf_config(**overrides):
    fields = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=48, dropout=0.0, pad_token_id=5,
                  mem_len=5)
    return transformers.XLNetConfig(**(fields | overrides))


def plm_inputs(batch=2, length=9, predict=3, seed=0):
    """Random ids and token types (A=0, B=1, <cls>=2 as XLNet's), a random factorization order with its
    perm_mask (targets see neither themselves nor later tokens) and one-hot target_mapping."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    types = torch.randint(0, 3, (batch, length), generator=generator)
    perm_mask = torch.zeros(batch, length, length)
    target_mapping = torch.zeros(batch, predict, length)
    for b in range(batch):
        order = torch.randperm(length, generator=generator)
        rank = torch.empty(length, dtype=torch.long)
        rank[order] = torch.arange(length)
        perm_mask[b] = (rank[None, :] >= rank[:, None]).float()  # i may not see j at or after i in the order
        for m, position in enumerate(order[-predict:]):
            target_mapping[b, m, position] = 1.0
    return ids, types, perm_mask, target_mapping


def assert_close(expected, actual, tol=TOL):
    assert expected.shape == actual.shape
    assert (expected - actual).abs().max().item() < tol


@pytest.mark.parametrize("attn_type, bi_data, reuse_len", [("bi", False, 0), ("bi", True, 4), ("uni", False, 0)])
def test_lm_head_logits_and_mems_match_transformers_over_two_segments(attn_type, bi_data, reuse_len):
    hf = randomize_(transformers.XLNetLMHeadModel(hf_config(attn_type=attn_type, bi_data=bi_data,
                                                            reuse_len=reuse_len or None)))
    ours = from_hf_model(hf)
    assert (ours.cfg.attn_type, ours.cfg.bi_data, ours.cfg.mem_len, ours.cfg.reuse_len) == (attn_type, bi_data, 5,
                                                                                          reuse_len)
    ids, types, perm_mask, mapping = plm_inputs()
    # transformers' unidirectional path cannot add a (B, T, T) mask to its causal one (broadcast error)
    perm_mask = perm_mask if attn_type == "bi" else None
    with torch.no_grad():
        first = hf(ids, token_type_ids=types, perm_mask=perm_mask, target_mapping=mapping, use_mems=True)
        logits, mems = ours(ids, token_type_ids=types, perm_mask=perm_mask, target_mapping=mapping, return_mems=True)
        assert_close(first.logits, logits)
        for theirs, mine in zip(first.mems, mems, strict=True):
            assert_close(theirs.transpose(0, 1), mine)  # HF keeps (M, B, D)
        ids2, types2, perm2, mapping2 = plm_inputs(seed=1)
        perm2 = perm2 if attn_type == "bi" else None
        second = hf(ids2, token_type_ids=types2, perm_mask=perm2, target_mapping=mapping2, mems=first.mems,
                    use_mems=True)
        logits2, mems2 = ours(ids2, token_type_ids=types2, perm_mask=perm2, target_mapping=mapping2, mems=mems,
                              return_mems=True)
        assert_close(second.logits, logits2)
        assert mems2[0].shape == (2, 5, 32)  # the last mem_len states
        for theirs, mine in zip(second.mems, mems2, strict=True):
            assert_close(theirs.transpose(0, 1), mine)
        content = hf(ids2, token_type_ids=types2, mems=first.mems).logits  # content stream, (B, T, V)
        assert_close(content, ours(ids2, token_type_ids=types2, mems=mems))


def test_padding_mask_without_a_permutation_matches_transformers():
    hf = randomize_(transformers.XLNetLMHeadModel(hf_config()), seed=3)
    ours = from_hf_model(hf)
    ids, types, _, _ = plm_inputs(seed=4)
    attention_mask = torch.ones(ids.shape)
    attention_mask[1, :3] = 0  # XLNet pads on the left
    with torch.no_grad():
        assert_close(hf(ids, attention_mask=attention_mask).logits, ours(ids, attention_mask=attention_mask))


def test_sequence_classification_reads_the_last_token_and_round_trips():
    hf = randomize_(transformers.XLNetForSequenceClassification(hf_config(num_labels=3)), seed=5)
    ours = from_hf_model(hf)
    assert hf_class_for(ours.cfg) == "XLNetForSequenceClassification" and ours.cfg.num_labels == 3
    ids, types, _, _ = plm_inputs(seed=6)
    with torch.no_grad():
        expected = hf(ids, token_type_ids=types).logits
        assert_close(expected, ours.classify(ids, token_type_ids=types))
        assert_close(expected, to_hf_model(ours)(ids, token_type_ids=types).logits, 1e-6)


def test_our_model_exported_to_transformers_gives_our_logits_and_weights_come_back():
    cfg = load_model_config("xlnet_tiny", dict(vocab_size=VOCAB, pad_token_id=5, mem_len=4))
    ours = randomize_(build_model(cfg, device="cpu"), seed=7)
    hf = to_hf_model(ours)
    assert type(hf).__name__ == "XLNetLMHeadModel"
    ids, types, perm_mask, mapping = plm_inputs(seed=8)
    with torch.no_grad():
        expected, mems = ours(ids, token_type_ids=types, perm_mask=perm_mask, target_mapping=mapping,
                              return_mems=True)
        actual = hf(ids, token_type_ids=types, perm_mask=perm_mask, target_mapping=mapping, use_mems=True)
        assert_close(expected, actual.logits)
        again = ours(ids, perm_mask=perm_mask, target_mapping=mapping, mems=mems)
        assert_close(again, hf(ids, perm_mask=perm_mask, target_mapping=mapping, mems=actual.mems).logits)
    back = from_hf_model(hf)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


@pytest.mark.parametrize("name, layers, width, heads, hf_d_inner", [("xlnet_large", 24, 1024, 16, 4096),
                                                                    ("xlnet_base", 12, 768, 12, 3072)])
def test_table_rows_count_what_transformers_builds_for_the_same_config(name, layers, width, heads, hf_d_inner):
    row = table_row(name)
    assert (row["family"], row["layers"], row["width"], row["heads"]) == ("xlnet", layers, width, heads)
    with torch.device("meta"):  # the released xlnet-*-cased shapes, written out independently of our adapter
        hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(
            vocab_size=32000, d_model=width, n_layer=layers, n_head=heads, d_inner=hf_d_inner))
    assert row["params"] == sum(p.numel() for p in hf.parameters())
    if name == "xlnet_large":
        assert row["params"] == 360_300_800 and row["documented_params"] == 340e6
        assert "126 GB" in row["data"] and "512 TPU v3" in row["training"] and "2.5 days" in row["training"]


def test_a_targets_prediction_never_sees_its_own_content():
    """Changing a target's token changes nothing in its own query-stream logits (nor in those of targets
    before it in the order), but does change the logits of targets after it."""
    cfg = load_model_config("xlnet_tiny", dict(vocab_size=VOCAB))
    model = randomize_(build_model(cfg, device="cpu"), seed=9)
    ids, types, perm_mask, mapping = plm_inputs(batch=1, length=10, predict=4, seed=10)
    positions = mapping[0].argmax(-1)  # targets in factorization order (the last `predict` of it)
    changed = ids.clone()
    changed[0, positions[1]] = (ids[0, positions[1]] + 1) % VOCAB
    with torch.no_grad():
        before = model(ids, types, perm_mask=perm_mask, target_mapping=mapping)
        after = model(changed, types, perm_mask=perm_mask, target_mapping=mapping)
    assert torch.equal(before[0, :2], after[0, :2])
    assert (before[0, 2:] - after[0, 2:]).abs().amax(-1).min() > 1e-6


def test_relative_shift_aligns_each_query_with_its_distance():
    """Independent reference: out[i, j] = scores[i, p] with the distance at index p equal to (M_mem + i) - j."""
    q_len, mem = 3, 2
    k_len = mem + q_len
    distances = torch.arange(k_len, -q_len, -1)  # k_len .. -q_len+1, as relative_sinusoid lays them out
    scores = torch.randn(1, 1, q_len, distances.numel())
    out = relative_shift(scores, k_len)
    for i in range(q_len):
        for j in range(k_len):
            p = int((distances == (mem + i) - j).nonzero())
            assert out[0, 0, i, j] == scores[0, 0, i, p]


def test_tied_head_and_mask_emb_is_a_parameter():
    model = build_model(load_model_config("xlnet_tiny"), device="meta")
    assert model.lm_head.weight is model.tok_embeddings.weight
    names = dict(model.named_parameters())
    assert "mask_emb" in names and "layers.0.attn.r_w_bias" in names and "layers.0.attn.seg_embed" in names

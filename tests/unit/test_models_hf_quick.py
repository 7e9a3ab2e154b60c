"""A quick architecture check against tiny randomly initialized Hugging Face models (GPT-2, BERT, T5 v1.0),
with weights copied by a throwaway name map. The full adapters and parity suite live in models/hf.py."""

import torch
import transformers

from scaletrain.models.registry import build_model, load_model_config


def ours(name):
    return build_model(load_model_config(name), device="cpu").eval()


def padded_batch(length, pad, seed=0):
    ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    ids[1, length - 3:] = pad
    return ids, mask


def test_gpt2_logits_match_transformers():
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        initializer_range=0.2)).eval()  # weights large enough that gelu and gelu_tanh differ visibly
    model, t = ours("gpt_tiny"), hf.transformer
    state = {"tok_embeddings.weight": t.wte.weight, "pos_embeddings.weight": t.wpe.weight,
             "final_norm.weight": t.ln_f.weight, "final_norm.bias": t.ln_f.bias}
    for i, block in enumerate(t.h):
        p = f"layers.{i}."
        qkv_w, qkv_b = block.attn.c_attn.weight.t().chunk(3), block.attn.c_attn.bias.chunk(3)  # Conv1D: (in, out)
        for j, n in enumerate("qkv"):
            state[p + f"attn.{n}_proj.weight"], state[p + f"attn.{n}_proj.bias"] = qkv_w[j], qkv_b[j]
        for ours_name, conv in (("attn.out_proj", block.attn.c_proj), ("mlp.fc_in", block.mlp.c_fc),
                                ("mlp.fc_out", block.mlp.c_proj)):
            state[p + ours_name + ".weight"], state[p + ours_name + ".bias"] = conv.weight.t(), conv.bias
        for ours_name, norm in (("attn_norm", block.ln_1), ("mlp_norm", block.ln_2)):
            state[p + ours_name + ".weight"], state[p + ours_name + ".bias"] = norm.weight, norm.bias
    assert model.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied
    ids, mask = padded_batch(12, 0)
    with torch.no_grad():
        diff = hf(ids, attention_mask=mask).logits - model(ids, mask)
    assert diff[mask.bool()].abs().max() < 1e-5


def test_bert_mlm_and_nsp_logits_match_transformers():
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    model, b, e = ours("bert_tiny"), hf.bert, hf.bert.embeddings
    head = hf.cls.predictions
    pairs = [("tok_embeddings", e.word_embeddings), ("pos_embeddings", e.position_embeddings),
             ("type_embeddings", e.token_type_embeddings), ("embedding_norm", e.LayerNorm),
             ("pooler.dense", b.pooler.dense), ("nsp_head", hf.cls.seq_relationship),
             ("mlm_head.dense", head.transform.dense), ("mlm_head.norm", head.transform.LayerNorm)]
    for i, layer in enumerate(b.encoder.layer):
        a, p = layer.attention, f"layers.{i}."
        pairs += [(p + "attn.q_proj", a.self.query), (p + "attn.k_proj", a.self.key), (p + "attn.v_proj", a.self.value),
                  (p + "attn.out_proj", a.output.dense), (p + "attn_norm", a.output.LayerNorm),
                  (p + "mlp.fc_in", layer.intermediate.dense), (p + "mlp.fc_out", layer.output.dense),
                  (p + "mlp_norm", layer.output.LayerNorm)]
    state = {f"{n}.{k}": v for n, module in pairs for k, v in module.state_dict().items()}
    state["mlm_head.decoder.bias"] = head.bias
    assert model.load_state_dict(state, strict=False).missing_keys == ["mlm_head.decoder.weight"]  # tied
    ids, mask = padded_batch(12, 0)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types)
        mlm, nsp = model(ids, token_type_ids=types, attention_mask=mask)
    assert (expected.prediction_logits - mlm)[mask.bool()].abs().max() < 1e-5
    assert (expected.seq_relationship_logits - nsp).abs().max() < 1e-5


def test_t5_logits_match_transformers():
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=256, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="relu")).eval()
    model = ours("t5_tiny")
    state = {"tok_embeddings.weight": hf.shared.weight}
    for stack_name, stack in (("encoder", hf.encoder), ("decoder", hf.decoder)):
        bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias  # HF keeps it in block 0 only
        state[f"{stack_name}.relative_bias.weight"] = bias.weight
        state[f"{stack_name}.final_norm.weight"] = stack.final_layer_norm.weight
        for i, block in enumerate(stack.block):
            p, sub = f"{stack_name}.layers.{i}.", list(block.layer)
            attentions = [("attn", sub[0].SelfAttention, sub[0].layer_norm)]
            if stack_name == "decoder":
                attentions.append(("cross_attn", sub[1].EncDecAttention, sub[1].layer_norm))
            for ours_name, attn, norm in attentions:
                for n, theirs in zip(("q", "k", "v", "out"), (attn.q, attn.k, attn.v, attn.o)):
                    state[p + f"{ours_name}.{n}_proj.weight"] = theirs.weight
                state[p + f"{ours_name}_norm.weight"] = norm.weight
            state[p + "mlp_norm.weight"] = sub[-1].layer_norm.weight
            state[p + "mlp.fc_in.weight"] = sub[-1].DenseReluDense.wi.weight
            state[p + "mlp.fc_out.weight"] = sub[-1].DenseReluDense.wo.weight
    assert model.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied
    ids, mask = padded_batch(12, 0)
    dec, dec_mask = padded_batch(7, 0, seed=1)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                      decoder_attention_mask=dec_mask).logits
        diff = expected - model(ids, dec, mask, dec_mask)
    assert diff[dec_mask.bool()].abs().max() < 1e-5

"""Pipeline-parallel training on gloo ranks against a single process: same model, data, seed and SGD steps.
The losses take their cross-entropy in fp32 (models/blocks.py), so float64 runs agree to ~1e-8, not 1e-15.

Every layout is compared on losses (within 1e-5 over 3 steps, float64) and on every final parameter. One
launch runs several cases to keep the process start-up cost down."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from scaletrain.configs.schema import ParallelConfig, TrainConfig, TrainerConfig
from scaletrain.data.objectives import synthetic_plm_batch
from scaletrain.models.registry import build_model, get_spec, load_model_config
from scaletrain.parallel import materialize, padded_model_config, parallelize, shard_optimizer_state
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.multiprocess import run_on_ranks
from scaletrain.parallel.pipeline import build_pipeline, n_microbatches

SEED, STEPS, LR = 7, 3, 0.5
BATCH, SEQ, DEC_SEQ = 8, 12, 10
FAMILY_MODELS = {"gpt": "gpt_tiny", "bert": "bert_tiny", "t5": "t5_tiny", "bart": "bart_tiny",
                 "transformer": "transformer_tiny", "xlnet": "xlnet_tiny"}


def model_config(name: str):
    return load_model_config(FAMILY_MODELS[name], {"n_layers": 4} if name in ("gpt", "bert", "xlnet") else {})


def make_batches(cfg, steps: int = STEPS) -> list[dict]:
    """Deterministic batches of the family's objective, with right padding so masks matter."""
    generator = torch.Generator().manual_seed(SEED)
    if cfg.family == "xlnet":  # both streams: perm_mask (B, T, T), target_mapping (B, M, T), labels (B, M)
        return [synthetic_plm_batch(BATCH, SEQ, cfg.vocab_size, SEED + step) for step in range(steps)]
    batches = []
    for _ in range(steps):
        ids = torch.randint(3, cfg.vocab_size, (BATCH, SEQ), generator=generator)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, -3:] = 0
        mask[5, -5:] = 0
        if cfg.family == "gpt":
            labels = torch.randint(3, cfg.vocab_size, (BATCH, SEQ), generator=generator)
            labels[2, :4] = -100
            batches.append({"input_ids": ids, "labels": labels})
        elif cfg.family == "bert":
            labels = torch.full((BATCH, SEQ), -100)
            picked = torch.rand(BATCH, SEQ, generator=generator) < 0.3
            labels[picked] = ids[picked]
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                            "token_type_ids": (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone(),
                            "next_sentence_label": torch.randint(0, 2, (BATCH,), generator=generator)})
        else:
            decoder_ids = torch.randint(3, cfg.vocab_size, (BATCH, DEC_SEQ), generator=generator)
            labels = torch.randint(3, cfg.vocab_size, (BATCH, DEC_SEQ), generator=generator)
            labels[3, -2:] = -100
            batches.append({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
                            "labels": labels})
    return batches


def token_count(batch: dict) -> int:
    count = int((batch["labels"] != -100).sum())
    return count + (int((batch["next_sentence_label"] != -100).sum()) if "next_sentence_label" in batch else 0)


def single_process_run(name: str):
    cfg = model_config(name)
    model = build_model(cfg, "cpu")  # plain eager construction: no meta device, no materialize()
    model.init_weights(SEED)
    model.to(torch.float64)
    spec = get_spec(cfg.family)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in make_batches(cfg):
        optimizer.zero_grad()
        outputs = model(**{k: batch[k] for k in spec.input_keys if k in batch})
        loss_sum, _ = spec.loss_fn(outputs, batch)
        loss = loss_sum / token_count(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        batch = make_batches(cfg, steps=1)[0]
        loss_sum, _ = spec.loss_fn(model(**{k: batch[k] for k in spec.input_keys if k in batch}), batch)
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, final_state, (loss_sum / token_count(batch)).item()


def _as_plain(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _pipeline_cases(rank, world_size, cases, checkpoint_dir=None):
    """Each case: (model name, ParallelConfig fields). Returns per case (losses, this rank's parameters,
    the loss of a forward-only pass after training). The model goes the trainer's way: meta, parallelize,
    materialize, then Pipeline.forward_backward (the trainer's pipeline branch) and SGD."""
    results = []
    for name, fields in cases:
        fields = dict(fields)
        checkpointing = fields.pop("activation_checkpointing", "none")
        autocast = fields.pop("autocast", None)  # e.g. torch.bfloat16: forwards under CPU autocast
        dtype = fields.pop("dtype", torch.float64)
        parallel = ParallelConfig(**{"dp_shard": 1, **fields})
        dims = ParallelDims.from_config(parallel, world_size)
        dims.build_mesh("cpu")
        cfg = padded_model_config(model_config(name), dims.tp)
        # parallelize: pipeline split, then per stage TP, activation checkpointing and FSDP / ZeRO
        train_cfg = TrainConfig(model=cfg, parallel=parallel,
                                trainer=TrainerConfig(activation_checkpointing=checkpointing))
        model = parallelize(build_model(cfg, "meta").to(dtype), dims, train_cfg)
        materialize(model, "cpu", SEED)
        n_micro = n_microbatches(TrainerConfig(global_batch=BATCH, micro_batch=BATCH // dims.dp_size // 4),
                                 dims.dp_size)
        pipe = build_pipeline(model.stages, cfg, parallel, n_micro, dims)
        optimizer = shard_optimizer_state(torch.optim.SGD(model.parameters(), lr=LR), model, dims)  # ZeRO-1
        losses = []
        for batch in make_batches(cfg):
            rows = BATCH // dims.dp_size
            local = {k: v[dims.dp_rank * rows:(dims.dp_rank + 1) * rows] for k, v in batch.items()}
            micro_batches = [{k: v[i::n_micro] for k, v in local.items()} for i in range(n_micro)]
            optimizer.zero_grad()
            context = torch.autocast("cpu", dtype=autocast) if autocast is not None else None
            loss_sum, scored = pipe.forward_backward(micro_batches, token_count(batch), context=context)
            totals = torch.stack([loss_sum, scored])
            if dims.dp_enabled:
                dist.all_reduce(totals, group=dims.dp_mesh_flat.get_group())
            assert int(totals[1]) == token_count(batch)
            losses.append((totals[0] / totals[1]).item())
            optimizer.step()
        eval_sum, eval_count = pipe.evaluate(make_batches(cfg, steps=1)[0])
        # training runs again after a forward-only pass (V schedules swap their action order for it)
        train_sum, _ = pipe.forward_backward(micro_batches, token_count(batch))
        torch.testing.assert_close(train_sum, pipe.evaluate(local)[0])
        optimizer.zero_grad()
        if checkpoint_dir is not None:  # every rank writes its shards under the whole model's names
            dcp.save(get_model_state_dict(model), checkpoint_id=f"{checkpoint_dir}/{name}")
        state = {k: _as_plain(v).detach().clone() for k, v in model.state_dict().items()}
        results.append((losses, state, (eval_sum / eval_count).item()))
        dist.barrier()
    return results


def assert_matches_single_process(name, results_per_rank, case_index, reference):
    ref_losses, ref_state, ref_eval = reference
    owned = {}
    for rank_results in results_per_rank:
        losses, state, eval_loss = rank_results[case_index]
        assert losses == pytest.approx(ref_losses, abs=1e-5), f"{name}: losses differ on some rank"
        assert eval_loss == pytest.approx(ref_eval, abs=1e-5), f"{name}: forward-only loss differs"
        for key, value in state.items():
            torch.testing.assert_close(value, ref_state[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
            owned[key] = value
    assert set(owned) == set(ref_state), f"{name}: parameters no stage owns: {set(ref_state) - set(owned)}"
    # the tied copies on the first and last stage are still bit-identical after the SGD steps
    head = "mlm_head.decoder.weight" if name == "bert" else "lm_head.weight"
    assert torch.equal(owned["tok_embeddings.weight"], owned[head]), f"{name}: tied copies drifted apart"


def assert_every_family_matches(world_size, fields):
    names = list(FAMILY_MODELS)
    results = run_on_ranks(_pipeline_cases, world_size, [(name, fields) for name in names], timeout=600)
    for index, name in enumerate(names):
        assert_matches_single_process(name, results, index, single_process_run(name))


@pytest.mark.parametrize("world_size,fields", [
    (2, dict(pp=2, pp_schedule="1f1b")),
    (4, dict(pp=4, pp_schedule="1f1b")),
    (2, dict(pp=2, pp_virtual=2, pp_schedule="interleaved_1f1b")),
], ids=["pp2_1f1b", "pp4_1f1b", "pp2_interleaved_v2"])
def test_pipeline_matches_single_process(world_size, fields):
    assert_every_family_matches(world_size, fields)


def test_every_schedule_matches_single_process():
    """GPipe, looped BFS and the zero-bubble schedules (ZBV and DualPipeV put the first and last stage on
    one rank) on a decoder-only, an encoder-decoder and the two-stream XLNet model."""
    layouts = [dict(pp=2, pp_schedule="gpipe"), dict(pp=2, pp_virtual=2, pp_schedule="looped_bfs"),
               dict(pp=2, pp_virtual=2, pp_schedule="interleaved_zb"), dict(pp=2, pp_virtual=2, pp_schedule="zbv"),
               dict(pp=2, pp_virtual=2, pp_schedule="dualpipev")]
    names = ("gpt", "t5", "xlnet")
    cases = [(name, fields) for name in names for fields in layouts]
    results = run_on_ranks(_pipeline_cases, 2, cases, timeout=600)
    references = {name: single_process_run(name) for name in names}
    for index, (name, _) in enumerate(cases):
        assert_matches_single_process(name, results, index, references[name])


@pytest.mark.parametrize("world_size,fields", [
    (4, dict(pp=2, tp=2)),
    (4, dict(pp=2, dp_shard=2, zero=3, activation_checkpointing="full")),
], ids=["pp2_tp2", "pp2_dp2_zero3_ac"])
def test_pipeline_composes_with_tensor_and_data_parallel(world_size, fields):
    assert_every_family_matches(world_size, fields)


def test_pipeline_with_zero1_and_replicated_data_parallel():
    cases = [(name, fields) for name in ("gpt", "t5")
             for fields in (dict(pp=2, dp_shard=2, zero=1), dict(pp=2, dp_replicate=2, zero=0))]
    results = run_on_ranks(_pipeline_cases, 4, cases, timeout=600)
    references = {name: single_process_run(name) for name in ("gpt", "t5")}
    for index, (name, _) in enumerate(cases):
        assert_matches_single_process(name, results, index, references[name])


def test_3d_pp2_tp2_dp2_on_eight_processes_and_resume_in_one(tmp_path):
    """pp2 x tp2 x dp2 (ZeRO-3) training; its DCP checkpoint then loads into a single-process model."""
    fields = dict(pp=2, tp=2, dp_shard=2, zero=3)
    names = ["gpt", "t5"]
    results = run_on_ranks(_pipeline_cases, 8, [(name, fields) for name in names], str(tmp_path), timeout=600)
    for index, name in enumerate(names):
        reference = single_process_run(name)
        assert_matches_single_process(name, results, index, reference)
        model = build_model(model_config(name), "cpu").to(torch.float64)
        state = model.state_dict()
        dcp.load(state, checkpoint_id=str(tmp_path / name))
        for key, value in state.items():
            torch.testing.assert_close(value, reference[1][key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")


def test_bf16_autocast_through_the_pipeline_tracks_fp32():
    """Mixed precision: the trainer passes its autocast context to forward_backward. bf16 matmuls (8-bit
    mantissa) keep the losses within 1% of the float64 single-process run, and the weights move the same way."""
    results = run_on_ranks(_pipeline_cases, 2, [("gpt", dict(pp=2, autocast=torch.bfloat16, dtype=torch.float32))],
                           timeout=600)
    ref_losses, ref_state, _ = single_process_run("gpt")
    initial = build_model(model_config("gpt"), "cpu")
    initial.init_weights(SEED)
    initial_state = {k: v.double() for k, v in initial.state_dict().items()}
    for losses, state, _ in (rank_results[0] for rank_results in results):
        assert losses == pytest.approx(ref_losses, rel=1e-2)
        assert losses != pytest.approx(ref_losses, abs=1e-5), "autocast did not reach the stages' forwards"
        for key, value in state.items():
            update, expected = value.double() - initial_state[key], ref_state[key] - initial_state[key]
            if expected.norm() > 1e-3:
                cosine = torch.nn.functional.cosine_similarity(update.flatten(), expected.flatten(), dim=0)
                assert cosine > 0.95, f"{key}: bf16 update points elsewhere (cosine {cosine:.3f})"

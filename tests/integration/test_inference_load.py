"""inference.load_model: a run folder, a step folder (saved in one process and at tp2 x dp... layouts) and a
Hugging Face folder give a plain eval-mode model whose tensors and logits equal the source's; bad paths
give one-line UserErrors."""

import pytest
import torch
import transformers

from scaletrain.errors import UserError
from scaletrain.inference.load import load_model
from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import full_params, make_trainer, tiny_overrides

RUN = ["trainer.max_steps=2", "checkpoint.every=1"]


def _train(run_dir, extra=()):
    trainer = make_trainer(run_dir, tiny_overrides("gpt", *RUN, *extra))
    assert trainer.train() == 0
    return full_params(trainer), trainer.data.tokenizer.hash


def _train_on_ranks(rank, world_size, run_dir):
    return _train(run_dir, ["parallel.tp=2", "parallel.dp_shard=1"])


def _assert_same_tensors(loaded, params):
    state = dict(loaded.model.named_parameters())
    assert set(state) == set(params)
    for name, tensor in params.items():
        assert torch.equal(state[name], tensor), name


def test_run_folder_step_folder_and_a_tp2_checkpoint(tmp_path):
    params, tokenizer_hash = _train(tmp_path / "single")
    loaded = load_model(tmp_path / "single")
    assert loaded.source.name == "step-000002" and loaded.family == "gpt" and not loaded.model.training
    assert loaded.tokenizer.hash == tokenizer_hash and loaded.hf_class is None
    _assert_same_tensors(loaded, params)
    earlier = load_model(tmp_path / "single" / "checkpoints" / "step-000001")
    assert earlier.source.name == "step-000001"

    (params_tp, _), _ = run_on_ranks(_train_on_ranks, 2, tmp_path / "tp2", timeout=240)
    _assert_same_tensors(load_model(tmp_path / "tp2"), params_tp)


def test_hugging_face_folder(tmp_path):
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="tokenizer"):
        load_model(tmp_path)  # no tokenizer files
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({str(i): i for i in range(96)}, unk_token="0")).save(str(tmp_path / "tokenizer.json"))
    loaded = load_model(tmp_path)
    assert loaded.hf_class == "GPT2LMHeadModel" and loaded.model.lm_head.weight is loaded.model.tok_embeddings.weight
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(ids) - hf_model(ids).logits).abs().max() <= 1e-5


def test_bad_paths_are_one_line_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for path, expected in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "neither a run folder"),
                           (tmp_path / "run", "no complete checkpoint")]:
        with pytest.raises(UserError, match=expected) as error:
            load_model(path)
        assert "\n" not in str(error.value)

"""scaletrain import-deepspeed (issue 19, item 4): a checkpoint that DeepSpeed itself wrote
(engine.save_checkpoint of our model in a user's wrapper, ZeRO 1/2/3 on 2 ranks) becomes a scaletrain run
folder holding the same fp32 weights, which model.init_from then starts a run from."""

import pytest
import torch
import torch.nn as nn

from scaletrain.cli import main
from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import checkpoint_params, full_params, make_trainer, tiny_overrides

MODEL = tiny_overrides("gpt")[:3]  # model=gpt_tiny model.vocab_size=512 data.tokenizer_vocab=512


class UsersWrapper(nn.Module):  # what a DeepSpeed user's script typically hands to deepspeed.initialize
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


def _save_with_deepspeed(rank, world_size, folder, zeros):
    from deepspeed.utils import safe_get_full_fp32_param

    from scaletrain.configs.store import compose_config
    from scaletrain.models.registry import build_model
    from scaletrain.parallel import materialize
    from scaletrain.parallel.deepspeed import import_deepspeed

    deepspeed = import_deepspeed("cpu")
    weights = {}
    for zero in zeros:
        model = materialize(build_model(compose_config(MODEL).model, device="meta"), "cpu", seed=zero)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
                  "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=UsersWrapper(model), optimizer=optimizer, config=config)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(2):
            logits = engine(torch.randint(0, 512, (2, 16), generator=generator))
            engine.backward(logits.float().logsumexp(-1).mean())
            engine.step()
        engine.save_checkpoint(str(folder / f"zero{zero}"))
        weights[zero] = {name: safe_get_full_fp32_param(p).clone() for name, p in model.named_parameters()}
    return weights


def test_deepspeed_checkpoints_of_every_zero_stage_import_with_their_weights(tmp_path):
    from scaletrain.configs.store import compose_config
    from scaletrain.data.prepare import build_datasets

    tokenizer = tmp_path / "tokenizer.json"  # the tiny runs' tokenizer, kept with the import for init_from
    tokenizer.write_text(build_datasets(compose_config(tiny_overrides("gpt")), progress=False).tokenizer.json)
    zeros = (1, 2, 3)
    written = run_on_ranks(_save_with_deepspeed, 2, tmp_path / "ds", zeros)[0]
    for zero in zeros:
        out = tmp_path / f"imported{zero}"
        assert main(["import-deepspeed", str(tmp_path / "ds" / f"zero{zero}"), "--out", str(out), *MODEL,
                     "--tokenizer", str(tokenizer)]) == 0
        saved = checkpoint_params(out / "checkpoints" / "step-000002")  # DeepSpeed's tag global_step2
        assert {f"model.{name}" for name in written[zero]} <= set(saved)
        for name, value in written[zero].items():
            torch.testing.assert_close(saved[f"model.{name}"], value, rtol=0, atol=0, msg=f"zero {zero}: {name}")

    started = make_trainer(tmp_path / "finetune", tiny_overrides("gpt", f"model.init_from={tmp_path / 'imported3'}",
                                                                 "trainer.max_steps=1"))
    for name, value in full_params(started).items():
        torch.testing.assert_close(value, written[3][name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    run_on_ranks(_save_with_deepspeed, 2, tmp_path / "ds", (2,))
    code = main(["import-deepspeed", str(tmp_path / "ds" / "zero2"), "--out", str(tmp_path / "out"), *MODEL,
                 "model.n_layers=3"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "holds another model" in error and "missing: layers.2." in error
    assert main(["import-deepspeed", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2

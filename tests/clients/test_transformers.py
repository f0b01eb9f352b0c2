"""Hugging Face's Trainer training a tiny GPT-2 with our optimizer, against the same run on torch.optim.

What the Trainer does with them: ``optimizers=(opt, sched)`` are taken as they are (or made by
``create_optimizer`` / ``create_scheduler``, which a subclass overrides); the optimizer goes through
accelerate's ``prepare`` (wrapped in an ``AcceleratedOptimizer``, whose ``prepare`` runs
``opt.load_state_dict(opt.state_dict())``), the scheduler is kept as it is, stepped unless it is a
``ReduceLROnPlateau`` and read with ``get_last_lr()``; each step clips with ``max_grad_norm`` (1.0
by default) through ``accelerator.clip_grad_norm_(model.parameters())``, then ``opt.step()``,
``sched.step()`` and ``model.zero_grad()`` (not the optimizer's). A checkpoint writes the model
with ``save_pretrained`` (safetensors), ``optimizer.state_dict()`` and ``scheduler.state_dict()``
with ``torch.save``; ``resume_from_checkpoint`` reads them back with ``torch.load(weights_only=True)``.

The model is randomly initialised from a config, with dropout off and tied input and output
embeddings (GPT-2's default); the data are generated token ids. Nothing is downloaded.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from .arms import EXACT, ORACLE, Arm, assert_same_tensors
from .environment import require_client

transformers = require_client("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

VOCAB, SEQUENCE, SAMPLES, BATCH = 96, 16, 32, 4
STEPS, SAVE_AT, WARMUP, LR = 12, 6, 3, 3e-3

#: GPT-2's attention key bias has an exact gradient of zero (softmax ignores a shift of every
#: score), so what arrives there is rounding noise of ~1e-10, which Adam divides by its own root
#: mean square: those elements take lr-sized steps in directions set by the rounding, and any change
#: of implementation moves them. torch's fused AdamW against its for-loop (``torch-fused``): up to
#: 8.5e-6 apart there after 12 steps, below 1.2e-7 everywhere else. atol is ~10x that, and still
#: ~30x below one step at this lr (3e-3).
GPT2_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}


class TokenIds(Dataset):
    """Generated token ids; the labels are the inputs (the model shifts them itself)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQUENCE), generator=gen)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQUENCE, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2 ships
    return model


def grouped_parameters(model: torch.nn.Module) -> list[dict]:
    """Weight decay for the matrices, none for biases and LayerNorms (HF's example scripts' split)."""
    no_decay = ("bias", "ln_")
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": 0.1},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]


def warmup_then_linear_decay(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return max(0.0, (STEPS - step) / (STEPS - WARMUP))


def arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
        weight_decay=0.1, warmup_steps=WARMUP, lr_scheduler_type="linear", max_grad_norm=1.0,
        save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    return TrainingArguments(**{**settings, **overrides})


class RecordingTrainer(Trainer):
    """A Trainer that keeps each step's loss and lr at full precision (its logs round them)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []

    def training_step(self, *args, **kwargs):
        self.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.detach().clone())
        return loss


def train_with_optimizers_argument(arm: Arm, output_dir, *, seed: int = 0, resume_from=None) -> RecordingTrainer:
    model = tiny_gpt2(seed)
    opt = arm.optim.AdamW(grouped_parameters(model), lr=LR, betas=(0.9, 0.98))
    sched = arm.sched.LambdaLR(opt, warmup_then_linear_decay)
    trainer = RecordingTrainer(model=model, args=arguments(output_dir), train_dataset=TokenIds(),
                               optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume_from)
    arm.assert_drove(trainer.optimizer, trainer.lr_scheduler)
    return trainer


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_training(candidate: RecordingTrainer, oracle: RecordingTrainer, **tolerance) -> None:
    assert len(candidate.losses) == len(oracle.losses) > 0
    torch.testing.assert_close(torch.stack(candidate.losses), torch.stack(oracle.losses), **tolerance)
    torch.testing.assert_close(candidate.lrs, oracle.lrs)
    assert_same_tensors(parameters(candidate.model), parameters(oracle.model), **tolerance)


def test_optimizers_argument_save_steps_and_resume(tmp_path, candidate):
    whole, resumed = {}, {}
    for arm in (ORACLE, candidate):
        whole[arm.name] = train_with_optimizers_argument(arm, tmp_path / arm.name)
        # A restarted job builds a fresh model (other weights), optimizer and scheduler, and resumes.
        checkpoint = tmp_path / arm.name / f"checkpoint-{SAVE_AT}"
        resumed[arm.name] = train_with_optimizers_argument(arm, tmp_path / f"{arm.name}-resumed", seed=99,
                                                           resume_from=str(checkpoint))
        resumed[arm.name].losses[:0] = whole[arm.name].losses[:SAVE_AT]
        resumed[arm.name].lrs[:0] = whole[arm.name].lrs[:SAVE_AT]
    oracle = whole[ORACLE.name]
    torch.testing.assert_close(oracle.lrs[:WARMUP], [LR * (k + 1) / WARMUP for k in range(WARMUP)])
    assert oracle.model.lm_head.weight is oracle.model.transformer.wte.weight
    assert_same_training(resumed[ORACLE.name], oracle, **EXACT)
    assert_same_training(whole[candidate.name], oracle, **GPT2_TOLERANCE)
    assert_same_training(resumed[candidate.name], whole[candidate.name], **EXACT)
    assert whole[candidate.name].model.lm_head.weight is whole[candidate.name].model.transformer.wte.weight


def trainer_creating(arm: Arm) -> type[RecordingTrainer]:
    class OwnOptimizerTrainer(RecordingTrainer):
        """Overrides ``create_optimizer`` only: the Trainer still makes its own (torch) scheduler."""

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(model))
                named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                self.optimizer = arm.optim.AdamW(
                    [
                        {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                    ],
                    lr=self.args.learning_rate,
                )
            return self.optimizer

    return OwnOptimizerTrainer


def test_trainer_subclass_overriding_create_optimizer(tmp_path, candidate):
    runs = {}
    for arm in (ORACLE, candidate):
        trainer = trainer_creating(arm)(model=tiny_gpt2(), args=arguments(tmp_path / arm.name, save_strategy="no"),
                                        train_dataset=TokenIds())
        trainer.train()
        arm.assert_drove(trainer.optimizer)
        assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)  # the Trainer's own
        runs[arm.name] = trainer
    assert runs[ORACLE.name].lrs[WARMUP] == LR
    assert_same_training(runs[candidate.name], runs[ORACLE.name], **GPT2_TOLERANCE)


def test_save_pretrained_and_reload(tmp_path, candidate):
    for arm in (ORACLE, candidate):
        trainer = train_with_optimizers_argument(arm, tmp_path / arm.name)
        model = trainer.model
        export = tmp_path / arm.name / "export"
        model.save_pretrained(export)
        assert (export / "model.safetensors").is_file()
        reloaded = GPT2LMHeadModel.from_pretrained(export)
        assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
        assert_same_tensors(reloaded.state_dict(), model.state_dict(), **EXACT)
        ids = TokenIds().ids[:BATCH]
        with torch.no_grad():
            loss = reloaded(input_ids=ids, labels=ids).loss
        assert math.isfinite(loss.item())

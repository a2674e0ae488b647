"""What the corpus configs build beside a library's own classes: wrappers as fine-tuning scripts
apply them (PEFT adapters, Hugging Face's gradient checkpointing), batches of the shapes each
model takes, and the losses of recipes whose model returns no loss (diffusion). Random weights,
nothing downloaded."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def hf_checkpointing(model: nn.Module, use_reentrant: bool) -> nn.Module:
    """``model.gradient_checkpointing_enable`` as fine-tuning scripts call it, in either mode."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # what HF's Trainer does for reentrant checkpointing
    return model


def lora(model: nn.Module, target_modules: list[str], r: int = 4, task_type: str = "CAUSAL_LM") -> nn.Module:
    """``peft.get_peft_model`` with a LoRA config (B starts at zero, as PEFT initialises it)."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, task_type=task_type)
    return peft.get_peft_model(model, config)


def prompt_tuning(model: nn.Module, virtual_tokens: int = 4) -> nn.Module:
    """PEFT prompt tuning: only the virtual-token embedding trains."""
    import peft

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    return peft.get_peft_model(model, config)


def ia3(model: nn.Module, target_modules: list[str], feedforward_modules: list[str]) -> nn.Module:
    """PEFT IA3: learned rescaling vectors, initialised to one."""
    import peft

    config = peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=target_modules, feedforward_modules=feedforward_modules
    )
    return peft.get_peft_model(model, config)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, channels: int, size: int, classes: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """``pixel_values`` and class labels (image classifiers take both as keywords)."""
    g = _gen(seed)
    pixels = torch.randn(batch, channels, size, size, generator=g)
    return {"pixel_values": pixels}, torch.randint(classes, (batch,), generator=g)


def seq2seq(batch: int, length: int, target_length: int, vocab: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Source ids and target ids for an encoder-decoder (the model shifts the labels itself)."""
    g = _gen(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return {"input_ids": ids}, torch.randint(3, vocab, (batch, target_length), generator=g)


def masked_lm(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Token ids with 15% of positions as targets, the rest ignored (-100), as BERT pre-training does."""
    g = _gen(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    labels = torch.where(torch.rand(batch, length, generator=g) < 0.15, ids, -100)
    labels[:, 0] = ids[:, 0]  # at least one target per row
    return {"input_ids": ids}, labels


def clip_pairs(batch: int, length: int, vocab: int, size: int, seed: int = 0) -> tuple[dict, None]:
    """Captions and images for CLIP's contrastive loss (the model returns it with ``return_loss``)."""
    g = _gen(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "return_loss": True}, None


def speech_ctc(batch: int, samples: int, frames: int, vocab: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Raw audio and CTC transcripts padded with -100, for ``Wav2Vec2ForCTC``."""
    g = _gen(seed)
    audio = torch.randn(batch, samples, generator=g)
    labels = torch.randint(1, vocab, (batch, frames), generator=g)
    labels[1:, frames // 2 :] = -100  # shorter transcripts are padded
    return {"input_values": audio}, labels


def speech_seq2seq(
    batch: int, mels: int, frames: int, target_length: int, vocab: int, seed: int = 0
) -> tuple[dict, torch.Tensor]:
    """Log-mel features and decoder targets for Whisper."""
    g = _gen(seed)
    features = torch.randn(batch, mels, frames, generator=g)
    return {"input_features": features}, torch.randint(3, vocab, (batch, target_length), generator=g)


def noisy_latents(
    batch: int, channels: int, size: int, cross: int = 0, length: int = 4, classes: int = 0, seed: int = 0
) -> tuple[dict, torch.Tensor]:
    """A denoising step's inputs: noised samples and timesteps (plus text states or class labels),
    and the noise to predict as the label."""
    g = _gen(seed)
    clean = torch.randn(batch, channels, size, size, generator=g)
    noise = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    alpha = (1 - t.float() / 1000).sqrt().view(-1, 1, 1, 1)
    inputs: dict[str, Any] = {"sample": alpha * clean + (1 - alpha**2).sqrt() * noise, "timestep": t}
    if cross:
        inputs["encoder_hidden_states"] = torch.randn(batch, length, cross, generator=g)
    if classes:
        inputs["hidden_states"] = inputs.pop("sample")
        inputs["class_labels"] = torch.randint(classes, (batch,), generator=g)
    return inputs, noise


def noise_mse(output: Any, noise: torch.Tensor) -> torch.Tensor:
    """The epsilon-prediction loss of DDPM training (a DiT that learns sigma predicts twice the channels)."""
    pred = output.sample if hasattr(output, "sample") else output[0]
    return F.mse_loss(pred[:, : noise.shape[1]].float(), noise)


def norm_gains_at_one(model: nn.Module) -> nn.Module:
    """BatchNorm gains at 1, as the EfficientNet paper and timm initialise them (transformers draws
    them from N(0, 0.02), which shrinks the activations ~50x per norm: see test_corpus)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
    return model

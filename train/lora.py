"""LoRA (Hu et al., arXiv 2106.09685) through peft, QLoRA's 4-bit base (Dettmers et al., arXiv
2305.14314) through bitsandbytes, and saving: the merged model plus the adapter alone.

E5-Mistral (arXiv 2401.00368) fine-tunes Mistral-7B with LoRA r=16, alpha 32 on all attention
and MLP projections; only the low-rank matrices train, so DDP's reducer sees the LoRA
parameters alone (frozen base weights carry no gradient and are not registered with it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from train.errors import UserError

ADAPTER_DIR = "adapter"  # <model folder>/adapter: the adapter alone, loadable onto the base model


def quantization_kwargs(quantization: str | None) -> dict:
    """`from_pretrained` arguments for the base weights: QLoRA's NF4 4-bit base with bf16 compute."""
    if quantization in (None, "none"):
        return {}
    if quantization != "4bit":
        raise UserError(f"model.quantization={quantization!r}: expected null or 4bit")
    if not torch.cuda.is_available():
        raise UserError("model.quantization=4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers run on "
                        "CUDA only; on this machine train without it (model.quantization=null)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError("model.quantization=4bit needs the bitsandbytes package: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            "dtype": compute}


def candidate_modules(model: nn.Module) -> list[str]:
    """Names (last component) of the layers LoRA can wrap: linear layers and 4-bit linear layers."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(backbone: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str],
               quantized: bool = False, gradient_checkpointing: bool = False) -> nn.Module:
    """The backbone wrapped by peft: base weights frozen, LoRA matrices trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise UserError(f"model.lora: r={r}, alpha={alpha}, dropout={dropout}: expected r >= 1, alpha > 0, "
                        "0 <= dropout < 1")
    candidates = candidate_modules(backbone)
    missing = [t for t in target_modules if t not in candidates]
    if not target_modules or missing:
        raise UserError(f"model.lora.target_modules: {', '.join(missing) or '(empty)'} not in this model; "
                        f"its linear layers are: {', '.join(candidates)}")
    if quantized:
        # casts norms to fp32 and enables input gradients, as QLoRA training needs
        backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none")
    return get_peft_model(backbone, config)


def enable_checkpointing(backbone: nn.Module) -> None:
    """Activation checkpointing per layer. Non-reentrant: it needs no input that requires grad
    (the frozen embedding's output does not) and restores the RNG, so dropout replays."""
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_lora(backbone: nn.Module) -> bool:
    return hasattr(backbone, "peft_config") and hasattr(backbone, "merge_and_unload")


def trainable_share(module: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total


def save_backbone(backbone: nn.Module, out: Path) -> None:
    """A LoRA backbone: the merged weights at `out` (an ordinary transformers folder), the adapter
    alone at `out/adapter`. The merge runs on a copy, so the training model keeps its adapter."""
    backbone.save_pretrained(out / ADAPTER_DIR)
    merged = copy.deepcopy(backbone).merge_and_unload()
    merged.save_pretrained(out)
    del merged


def load_adapter(backbone: nn.Module, adapter: Path, trainable: bool = False) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(backbone, adapter, is_trainable=trainable)

"""LoRA adapters on a student network through PEFT, and merging them back for export.

diffusers' ``UNet2DModel`` has no ``add_adapter``; ``peft.inject_adapter_in_model`` works on any module,
replaces the target layers by LoRA layers and freezes every base weight (FACTS.md).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from distill.core.atomic import write_folder


def inject_lora(net: nn.Module, rank: int, alpha: float, target_modules: list[str]) -> nn.Module:
    """Add a trainable LoRA adapter (adapter name ``default``) to ``net`` in place; base weights frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    try:
        net = inject_adapter_in_model(config, net)
    except ValueError as e:  # peft names the modules it could not find
        raise ValueError(f"lora.target_modules {list(target_modules)} do not fit the student network: {e}") from None
    return net


def has_lora(net: nn.Module) -> bool:
    return any("lora_" in name for name, _ in net.named_parameters())


def merged_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every LoRA layer merged into its base layer and replaced by it."""
    from peft.tuners.lora import LoraLayer

    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, module.get_base_layer())
    return net.requires_grad_(True)


def save_peft_adapter(net: nn.Module, lora: dict, folder, base_model: str | None = None):
    """Write the LoRA adapter of ``net`` in PEFT's own layout (``adapter_config.json`` + ``adapter_model.safetensors``),
    loadable with ``PeftModel.from_pretrained(base_network, folder)``; written to a temporary folder and renamed."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    if not has_lora(net):
        raise ValueError("the network holds no unmerged LoRA adapter to export")
    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["target_modules"]),
                        base_model_name_or_path=base_model)
    # PeftModel's own keys: base_model.model.<module>.lora_A.weight (the adapter name dropped)
    state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}

    def fill(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"))

    return write_folder(folder, fill)  # atomic: a failed write leaves the old folder (distill.core.atomic)

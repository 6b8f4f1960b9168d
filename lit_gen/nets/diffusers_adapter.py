"""One adapter for networks owned by diffusers: its own model classes, behind lit_gen's net contract.

``DiffusersNet(x_in, c_noise, label) -> F`` runs ``UNet2DModel``, ``UNet2DConditionModel`` (class labels, no text)
or ``DiTTransformer2DModel`` exactly as diffusers' pipelines call them: ``c_noise`` is passed as the model's
``timestep`` (a ``DiscreteVP`` parameterisation makes it the teacher's own timestep, EDM Table 1 VP column), the
label as ``class_labels``, and a DiT that learned its variance (2C output channels) returns its first C channels,
the ε half, as ``DiTPipeline`` does. The model's ``config.json`` travels as this module's ``init_args`` (so a
teacher file is self-describing) and its weights as ``model.*`` tensors.

diffusers is imported lazily (it takes seconds): only building a ``DiffusersNet`` needs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

MODEL_CLASSES: dict[str, str] = {
    "UNet2DModel": "pixel or latent U-Net (DDPM, google/ddpm-*), unconditional or with num_class_embeds",
    "UNet2DConditionModel": "latent U-Net (Stable Diffusion family) conditioned by class labels only (no text)",
    "DiTTransformer2DModel": "DiT (Peebles & Xie 2023), class-conditional with a null class for guidance",
}
_CONFIG_ONLY_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def diffusers_class(name: str) -> type:
    """The diffusers model class named ``name`` (only the ones in ``MODEL_CLASSES``)."""
    if name not in MODEL_CLASSES:
        raise LitGenError(f"unsupported diffusers model class {name!r}; lit_gen imports {', '.join(MODEL_CLASSES)}")
    import diffusers

    return getattr(diffusers, name)


def _has_cross_attention(config: dict[str, Any]) -> bool:
    blocks = list(config.get("down_block_types", [])) + list(config.get("up_block_types", []))
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    return any("CrossAttn" in b for b in blocks) or "CrossAttn" in mid


def class_count(model_class: str, config: dict[str, Any]) -> tuple[int, bool]:
    """(number of real classes, whether the label table has a null row) of a diffusers model config."""
    if model_class == "DiTTransformer2DModel":
        return int(config.get("num_embeds_ada_norm") or 0), True  # DiT's LabelEmbedding: K rows + 1 null row
    if config.get("class_embed_type") not in (None, "identity") or config.get("projection_class_embeddings_input_dim"):
        raise LitGenError(
            f"{model_class} with class_embed_type={config.get('class_embed_type')!r} is not a class-label model"
        )
    return int(config.get("num_class_embeds") or 0), False


class DiffusersNet(Configurable, nn.Module):
    """A diffusers model as a lit_gen network F(x_in, c_noise, label).

    ``label=None`` means the null class where the table has one (DiT), and class 0 otherwise (a ``UNet2DModel``
    with ``num_class_embeds`` has no unconditional row; classifier-free guidance is refused for it).

    Args:
        model_class: "UNet2DModel", "UNet2DConditionModel" or "DiTTransformer2DModel".
        config: the model's diffusers config (its ``config.json``).
        num_classes: the number of real classes (``class_count`` of the config; recorded so that lit_gen's
            class-conditional code reads it from ``init_args`` as for its own networks); must match the config.
        timestep_freq_shift: if set, the ``downscale_freq_shift`` of the model's sinusoidal timestep features
            (diffusers' DiT uses 1; a facebookresearch DiT ``.pt`` was trained with 0, ``importers.dit``).
    """

    def __init__(
        self, model_class: str, config: dict[str, Any], num_classes: int = 0, timestep_freq_shift: float | None = None
    ) -> None:
        super().__init__()
        cls = diffusers_class(model_class)
        config = {k: v for k, v in config.items() if k not in _CONFIG_ONLY_KEYS}
        if model_class == "UNet2DConditionModel" and _has_cross_attention(config):
            raise LitGenError(
                "this UNet2DConditionModel has cross-attention blocks (it needs text embeddings); lit_gen imports "
                "UNet2DConditionModel conditioned by class labels only"
            )
        self.model_class = model_class
        self.model = cls.from_config(config)
        if timestep_freq_shift is not None:  # facebookresearch DiT: frequencies exp(−ln 10⁴·i/half), i.e. shift 0
            for module in self.model.modules():
                if type(module).__name__ == "Timesteps":
                    module.downscale_freq_shift = float(timestep_freq_shift)
        cfg = self.model.config
        self.in_channels = int(cfg.in_channels)
        out_channels = int(cfg.out_channels or cfg.in_channels)
        self.learned_sigma = out_channels == 2 * self.in_channels
        if out_channels not in (self.in_channels, 2 * self.in_channels):
            raise LitGenError(f"{model_class} has {out_channels} output channels for {self.in_channels} inputs")
        self.num_classes, self.has_null = class_count(model_class, dict(cfg))
        if self.num_classes != num_classes:
            raise LitGenError(f"num_classes={num_classes} but the {model_class} config has {self.num_classes} classes")
        if model_class == "DiTTransformer2DModel":
            self.feature_dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
        else:
            self.feature_dim = int(cfg.block_out_channels[-1])

    def _labels(self, label: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if not self.num_classes:
            return None
        if label is None:
            fill = self.num_classes if self.has_null else 0
            return torch.full((batch,), fill, dtype=torch.long, device=device)
        label = label.reshape(-1).to(device=device, dtype=torch.long)
        if not self.has_null and bool((label >= self.num_classes).any()):
            raise LitGenError(f"this {self.model_class} has no null class (labels 0..{self.num_classes - 1} only)")
        return label

    def _timestep(self, c_noise: Tensor | float, batch: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(c_noise, device=device).to(torch.float32).reshape(-1)
        return t.expand(batch) if t.numel() == 1 else t

    def forward(self, x: Tensor, c_noise: Tensor, label: Tensor | None = None) -> Tensor:
        """The model's raw output (ε, v or x by its scheduler's prediction type) at timestep ``c_noise``."""
        b = x.shape[0]
        t = self._timestep(c_noise, b, x.device)
        labels = self._labels(label, b, x.device)
        x = x.to(next(self.model.parameters()).dtype)
        if self.model_class == "UNet2DConditionModel":
            out = self.model(x, t, encoder_hidden_states=None, class_labels=labels, return_dict=False)[0]
        elif self.model_class == "DiTTransformer2DModel":
            out = self.model(x, timestep=t, class_labels=labels, return_dict=False)[0]
        else:
            out = self.model(x, t, class_labels=labels, return_dict=False)[0]
        return out[:, : self.in_channels] if self.learned_sigma else out

    def features(self, x: Tensor, c_noise: Tensor, label: Tensor | None = None) -> Tensor:
        """An intermediate representation for discriminator heads: the U-Net's mid-block output [B, C, r, r], or
        the DiT's last transformer block tokens [B, D, h, w]. Captured with a forward hook on diffusers' module."""
        target = self.model.transformer_blocks[-1] if self.model_class == "DiTTransformer2DModel" else None
        target = target if target is not None else self.model.mid_block
        if target is None:
            raise LitGenError(f"this {self.model_class} has no mid block to take features from")
        captured: list[Tensor] = []

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = target.register_forward_hook(hook)
        try:
            self.forward(x, c_noise, label)
        finally:
            handle.remove()
        h = captured[0]
        if h.ndim == 3:  # DiT tokens [B, N, D] -> [B, D, h, w]
            side = int(round(h.shape[1] ** 0.5))
            h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)
        return h

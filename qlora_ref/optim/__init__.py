"""Optimizers for QLoRA fine-tuning: the paged AdamW of paper section 3, "Paged Optimizers".

See :mod:`qlora_ref.optim.paged_adamw`.
"""
from .paged_adamw import OPTIMIZERS, PagedAdamW, adamw_update, make_optimizer

__all__ = ["PagedAdamW", "adamw_update", "make_optimizer", "OPTIMIZERS"]

"""The main job: a tiny GPT, toy tasks, and the pretrained base model QLoRA fine-tunes.

- :mod:`qlora_ref.train.gpt`: the decoder-only transformer.
- :mod:`qlora_ref.train.tasks`: generated digit tasks, batches and evaluation.
- :mod:`qlora_ref.train.pretrain`: pretraining and safetensors save/load.
"""

"""Pruned models in formats other tools load: a self-describing Hugging Face folder
(``hf_config``: stock config or remote code), GGUF for llama.cpp (``gguf_writer``), llama.cpp
decode speed (``llamacpp_speed``) and an offline lm-evaluation-harness task (``lmeval``)."""

"""Export: merge the LoRA adapter into the base model (merge.py) and GGUF conversion, quantization
and load-back checks with llama.cpp (gguf.py)."""

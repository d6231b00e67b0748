"""Our decoder modules (llama.py, opt.py) over paged attention (attention.py), safetensors loading
(loader.py) and model names -> local HF folders (registry.py)."""

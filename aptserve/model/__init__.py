"""Our decoder modules (llama.py, opt.py) over paged attention (attention.py) for KV and hidden-cache
requests (hidden.py), per-step attention metadata (metadata.py), safetensors loading (loader.py) and
model names -> local HF folders (registry.py)."""

"""Our decoder modules (llama.py, opt.py; one row each in architectures.py, each a CausalLM of protocol.py) over
paged attention (attention.py) for KV and hidden-cache requests (hidden.py), the attention plan they read
(attention_metadata.py) and weight loading (loader.py). Nothing here knows about the scheduler or the runner."""

"""The compression room: make a model smaller (and faster) before it ships, measure what it cost, export it.

    rft compress --method int4 --adapter rft-demo/adapter --out smollm2-int4
    from rftkit.compress.transforms import compress; from rftkit.compress.folder import save_compressed

  transforms.py  compress(model, method, ...): one entry over every method; CompressConfig and its checks
  quantize.py    weight-only int8 / int4 layers and their decode kernels
  prune.py       magnitude, Wanda, N:M and structured (neurons, heads) pruning
  factorize.py   SVD low-rank factorization, k-means weight sharing
  distill.py     knowledge distillation into the pruned student
  folder.py      the compressed model folder (compress.json): save, load (registered with rftkit.loading), densify
  report.py      rft compress: size, perplexity, accuracy and decode speed against the original; sweeps
  export.py      rft export: a merged model as an HF folder or a GGUF file

This file imports nothing, so each caller imports only the module it needs: loading a compressed folder
(folder.py, quantize.py) does not load the report's engine and evaluation. Nothing below this room imports it:
the quantized layers reach the model's grouped q/k/v call and the engine's one-call decode stack through what
they register with rftkit.layers (register_linears, register_quantized).
"""

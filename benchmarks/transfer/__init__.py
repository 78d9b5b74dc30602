"""The transfer benchmark: does RLRR learn, against LoRA, SSF, linear probing and full fine-tuning?

A miniature of the paper's Table 2 / Fig. 1 (VTAB-1k: 1,000 training images a task, accuracy
against trainable parameters) that runs on 2 CPU cores with nothing downloaded:

- `fractals`, `backbone`: a small ViT of the zoo's ViT family pretrained here from scratch on
  FractalDB-style formula-driven images, cached as safetensors;
- `tasks`: three target tasks written as ImageFolder trees: real handwritten digits
  (scikit-learn), dSprites-like x position, CLEVR-like counting;
- `methods`: the rows (RLRR at the paper placement, rank 1 and 4; PEFT LoRA r=8; SSF; linear
  probing; full fine-tuning), all trained by `finetune`'s own loop;
- `run`: the learning-rate sweep, the seeds, `python -m export.onnx` on every RLRR seed and its
  onnxruntime accuracy; `report`: `benchmarks/results/transfer.{json,md,png}`.

`python -m benchmarks.transfer [--quick]`; docs/transfer.md has the protocol and the results.
Nothing here is imported by the library; this module imports nothing heavy (the CLI sets the
OpenMP wait policy before torch loads).
"""

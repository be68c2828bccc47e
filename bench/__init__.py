"""The bench: our runtime against torch's activation checkpointing on one seeded model.

`python -m bench` (bench/cli.py) measures every contender (bench/contenders.py) on deep copies of
the same model and batch: step time (bench/measure.py, interleaved), peak memory, bytes moved and
recomputed, gradients against plain; `--max-fit` (bench/maxfit.py) and `--steps`
(bench/losscurve.py) add the largest batch under a memory cap and a loss-curve check. Models:
the embedded GPT (bench/gpt.py) and a Llama-like one (bench/llama.py), named in bench/presets.py.
"""

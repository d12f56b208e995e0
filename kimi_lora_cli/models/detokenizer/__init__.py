"""Kimi-Audio audio detokenizer: semantic tokens -> mel (flow-matching DiT) -> waveform (BigVGAN).

  config.py     the two config files of a release folder (`audio_detokenizer/config.yaml`,
                `vocoder/config.json`) as small frozen dataclasses (no torch import)
  dit.py        the DiT that predicts the flow-matching velocity, with a block KV cache
  vocoder.py    BigVGAN with anti-aliased Snake activations, plain PyTorch
  streaming.py  the official chunked streaming rules, Euler sampling, overlap smoothing
  checkpoint.py reading `model.pt` files (tensors only) with strict name and shape checks
  tiny.py       seeded tiny `audio_detokenizer/` + `vocoder/` folders in the release layout

Load through `kimi_lora_cli.loading.load_detokenizer(folder)`.
"""

"""The model: configs, UniFusion instance tokenizer, gated-fuser UNet on diffusers, ScaleU/FreeU skips, text
encoder, autoencoders. Layout arrays -> object tokens -> noise prediction.
Imports nothing else from instdiff_lib (the bottom layer, with ``layouts``)."""

"""The SDXL models: U-Net (`unet`), VAE (`vae`), CLIP text encoders (`clip`) and the tokenizer."""

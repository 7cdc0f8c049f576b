"""Model code for aptserve and how it runs: configs, generator, VAE, text encoders, sampling, pipeline. No HTTP."""

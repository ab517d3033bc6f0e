"""Image models: a class-conditional DCGAN and a class-conditional convolutional VAE on small images.

data.py reads an .npz or a zip of PNG/JPEG files into an `ImageDataset` in [-1, 1] (guards against
archive bombs and unsafe paths first); shapes.py is the shared 8..64 -> 4x4 ladder; vae.py and gan.py
are the models; pca.py the linear baseline the VAE is measured against; train.py the epoch loops;
sampling.py seeded sampling and PNGs; metrics.py the Fréchet distance. Imports torch, PIL and
scikit-learn, so only worker processes load it; no job or API wiring yet.
"""

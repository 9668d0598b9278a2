"""Video data: the CoCLR-format LMDB, the frame sampler, augmentation and the one dataset class."""

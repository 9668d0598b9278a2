"""Video data: the CoCLR-format LMDB, the frame sampler, augmentation and the one dataset class."""
from .lmdb_video import VideoLMDB, LMDBWriter, decode_frames, encode_frames  # noqa: F401
from .video_dataset import VideoDataset, DatasetName, build_dataset, default_data_root  # noqa: F401

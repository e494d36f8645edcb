"""Quality evaluation: the video-needle benchmark, its trained model and ``apbv eval``."""

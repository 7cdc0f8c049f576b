"""Fragmented MP4: the ffmpeg encoder that turns frame chunks into fMP4 pieces, and MP4 box parsing."""

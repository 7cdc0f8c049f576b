"""aptserve: one-step (adversarially post-trained) text-to-video, served in real time.

One import package so no part of it can collide with a PyPI name: `engines` (models), `kernels` (ops), `media`
(fragmented MP4), `server` (HTTP), `training` (the APT recipe), `evaluation`, and `cli` above them all. Importing
`aptserve` itself loads nothing heavy, so `aptserve.engines` and `aptserve.kernels` work without the server stack.
"""

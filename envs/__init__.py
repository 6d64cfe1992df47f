"""Simulated environments for robot policies (PushT, ALOHA through lerobot): `envs.sim` runs episodes,
`envs.video` draws kept-token overlays and writes episode videos."""

import os

# Headless machines render ALOHA through EGL; this must happen before mujoco is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")

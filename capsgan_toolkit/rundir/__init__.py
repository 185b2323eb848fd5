"""Run folders: the folder object, checkpoint files, logs and pictures."""

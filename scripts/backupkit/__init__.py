"""Internal library shared by the external-backup scripts.

Each module holds one mechanism (configuration, S3, the streaming upload, subprocess pipelines,
encryption formats, manifests, progress); the scripts in ``scripts/`` are thin fronts over them.
"""

__version__ = "0.1.0"

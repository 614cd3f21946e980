"""Celery training workers (each RLHF step as a child process) and inference workers.

Workers use `rlhf_engine`; `rlhf_engine` knows nothing of them. (Built in issues 6 and 7.)
"""

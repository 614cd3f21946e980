"""The database of record: SQLAlchemy 2.x models, sessions, and Alembic migrations applied at start."""

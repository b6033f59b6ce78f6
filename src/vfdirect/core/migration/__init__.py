"""Live migration, pure parts: dirty-page marks, the migration stream, the phase record."""

"""The ``regsandbox`` command: initialise the data directory, start and stop the platform."""

"""Stand-ins for inference engines: servers with an engine's timing and no model, for measuring
the clients that drive them (scheduling, not model speed).
"""
